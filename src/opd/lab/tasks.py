"""The lab's two verifiable domains, with demonstrations that carry a *systematic* error.

A base model pretrained on these demonstrations learns the error as its most likely answer, so an RL
teacher has to change the mode of the distribution, not merely sharpen it (research/lab-feasibility.md:
with random digit noise the RL gain was pure temperature sharpening, which left ExOPD no room).

- `sums` (graded like math, by the math grader): a running sum of three or four digits written as a chain,
  `7+5+9` -> `7+5=12;12+9=21;#21`. The demonstrations drop the carry (`7+5=2`) in `carry_error` of the steps
  that have one, and continue consistently from the wrong value. A `shortcut` share of them skips the working
  and writes only the answer the chain would have reached (`#21`, carry errors included), so the length of the
  reasoning is the model's choice: a model can answer in four tokens or in twenty, and the working is what
  a policy can learn to get right (G-OPD's length finding needs a domain where the length can change).
- `programs` (graded like code, unit tests in the sandbox): a chain of operations in words,
  `add 3, times 2, minus 1` -> `def f(x):return (x+3)*2-1`, checked by asserts on five inputs. The
  demonstrations forget the parentheses that precedence needs (`x+3*2-1`) in `parenthesis_error` of the
  places that need them. The two domains fail differently, so their teachers teach different skills.

Train and test prompts are disjoint by construction (a hash of the prompt text decides the split).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

DOMAINS = ("sums", "programs")
TEST_INPUTS = (-2, 0, 1, 3, 7)


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    domain: str
    prompt: str
    answer: str  # sums: the final number; programs: the correct program
    tests: str  # programs: asserts on TEST_INPUTS; sums: ""


def is_test_prompt(prompt: str, test_share: float = 0.2) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0] < 256 * test_share


def sums_problem(rng: random.Random) -> list[int]:
    return [rng.randint(1, 9) for _ in range(rng.choice((3, 3, 4)))]


def sums_response(digits: list[int], rng: random.Random | None = None, carry_error: float = 0.0) -> str:
    """The chain of partial sums; with `rng`, each carrying step drops its carry with probability carry_error."""
    total, steps = digits[0], []
    for digit in digits[1:]:
        result = total + digit
        if rng is not None and (total % 10) + digit >= 10 and rng.random() < carry_error:
            result -= 10  # the dropped carry
        steps.append(f"{total}+{digit}={result}")
        total = result
    return ";".join(steps) + f";#{total}"


def programs_problem(rng: random.Random) -> list[tuple[str, int]]:
    """An additive step, a multiplication (which needs parentheses around it), then one or two more."""
    operations = [(rng.choice(("add", "minus")), rng.randint(1, 9)), ("times", rng.randint(2, 5))]
    for _ in range(rng.choice((1, 2))):
        operations.append((rng.choice(("add", "minus", "times")), rng.randint(2, 5)))
    return operations


def programs_response(operations: list[tuple[str, int]], rng: random.Random | None = None,
                      parenthesis_error: float = 0.0) -> str:
    expression, additive = "x", False
    for name, value in operations:
        if name == "times":
            if additive and not (rng is not None and rng.random() < parenthesis_error):
                expression = f"({expression})"
            expression, additive = f"{expression}*{value}", False
        else:
            expression, additive = f"{expression}{'+' if name == 'add' else '-'}{value}", True
    return f"def f(x):return {expression}"


def programs_value(operations: list[tuple[str, int]], x: int) -> int:
    for name, value in operations:
        x = x + value if name == "add" else x - value if name == "minus" else x * value
    return x


def make_problem(domain: str, rng: random.Random) -> tuple[Problem, object]:
    if domain == "sums":
        digits = sums_problem(rng)
        return Problem(domain=domain, prompt="+".join(map(str, digits)), answer=str(sum(digits)), tests=""), digits
    operations = programs_problem(rng)
    tests = "\n".join(f"assert f({x}) == {programs_value(operations, x)}" for x in TEST_INPUTS)
    prompt = ", ".join(f"{name} {value}" for name, value in operations)
    return Problem(domain=domain, prompt=prompt, answer=programs_response(operations), tests=tests), operations


def problems(domain: str, count: int, seed: int, test: bool) -> list[Problem]:
    """`count` distinct problems of one split (train or test)."""
    rng, seen, found = random.Random(f"{domain}/{seed}/{test}"), set(), []
    for _ in range(count * 200):
        problem, _ = make_problem(domain, rng)
        if problem.prompt not in seen and is_test_prompt(problem.prompt) == test:
            seen.add(problem.prompt)
            found.append(problem)
            if len(found) == count:
                return found
    raise ValueError(f"lab: only {len(found)} distinct {domain} problems, {count} asked")


@dataclass(frozen=True, kw_only=True, slots=True)
class Demonstrations:
    """How the pretraining corpus is written: the error rates, and the surface style."""

    carry_error: float = 0.6
    parenthesis_error: float = 0.6
    spaced: float = 0.0  # share written in the mismatched student's style: every symbol separated by a space
    shortcut: float = 0.25  # share of sums answered without the working (the same answer, errors included)


def demonstration(domain: str, rng: random.Random, style: Demonstrations) -> tuple[str, str]:
    """A (prompt, response) pair from the training split, with the systematic error of `style`."""
    while True:
        problem, raw = make_problem(domain, rng)
        if not is_test_prompt(problem.prompt):
            break
    if domain == "sums":
        # The shortcut's draw comes after the chain's, so the chain's carry errors are the same either way.
        chain = sums_response(raw, rng, style.carry_error)
        response = chain.rpartition(";")[2] if style.shortcut and rng.random() < style.shortcut else chain
    else:
        response = programs_response(raw, rng, style.parenthesis_error)
    if style.spaced and rng.random() < style.spaced:  # no draw at 0: the plain corpus stays as it was
        response = " ".join(response.replace(" ", "_")).replace("_", " ")
    return problem.prompt, response
