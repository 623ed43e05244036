"""The runner: the first Python code inside the sandbox, which runs the program, then its tests, and proves
that the tests ran to their end.

`sandbox.py` starts it as `python -I -S -B -c <this file's text> <setup fd> <proof fd>`; it is never
imported inside the sandbox (the checkout may be hidden there), but the parent imports it to test the
comparison helpers. Order of events:
1. read {program, tests, token} from the setup descriptor and close it, compile the tests with their
   comparisons hardened (below), and keep the token and the tests only in this function's locals: the
   program's own file (program.py) holds the program alone, and the tests never touch the file system,
   argv, linecache or the environment;
2. snapshot what the tests need (the builtins, exec, os.write, os._exit) before any program code runs;
3. run the program as `__main__`; then the tests, in the program's globals (MBPP's setup code and
   HumanEval's `check` use the program's definitions) but with the pristine builtins;
4. only when the tests return normally: flush output, write the token to the proof descriptor and
   `os._exit(0)` at once (no atexit handler, no finaliser, no thread of the program runs after that).
Any exit before step 4, of any status and by any route (sys.exit, os._exit, atexit, excepthook, a signal
handler), never writes the token, and the parent counts a pass only when exactly the token arrived.

Hardened comparisons: in the tests (trusted benchmark code, never the program) every `==`, `!=`, `<`,
`<=`, `>`, `>=`, `in`, `not in`, and every truth test of `assert`, `if`, `while`, `not`, `and`, `or`,
first turns both operands into plain data: exact builtin scalars (int, float, complex, str, bytes, bool,
None) and containers (list, tuple, dict, set, frozenset, deque) of plain data. Subclasses of those (a
Counter, an OrderedDict, a namedtuple, a program's own `class Evil(int)`) are read through the base type's
C methods, which ignore overridden methods, so a subclass compares by its builtin value. Plain data is then
compared by the builtin operators, which run no program code. An operand that stays opaque (an object of
a program's own class, a generator) is never equal to plain data (`==` is False, `!=` True), and ordering,
membership or a truth test with one raises TypeError; two opaque operands use their own operators.

What this does not stop (sandbox.py's docstring says it for the whole sandbox): the program runs in this
same process, so code of the program that runs while the tests run (the functions under test, threads it
started, trace or audit hooks, ctypes) can read the tests' frames and this function's locals, the token
among them, and forge the proof, or change objects the tests use (a module such as math patched before the
tests import it). Defeating that takes running the tests in a process the program cannot touch.
"""

import builtins as _builtins

# Every function below looks its builtins up in this copy, taken before any program code runs: a program
# that patches builtins.type or builtins.issubclass changes the real module, not this.
__builtins__ = dict(_builtins.__dict__)

import collections  # noqa: E402  (the classes are kept: a program may rebind collections.deque later)
import operator  # noqa: E402


def main():
    import builtins
    import json
    import os
    import sys

    setup_fd, proof_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while chunk := os.read(setup_fd, 1 << 20):
        chunks.append(chunk)
    os.close(setup_fd)
    setup = json.loads(b"".join(chunks))
    del chunks
    token, program_path = setup["token"].encode(), setup["path"]
    suffix = os.urandom(8).hex()  # helper names the program cannot guess from its own text
    names = {"compare": f"__opd_compare_{suffix}", "truth": f"__opd_truth_{suffix}"}
    tests = _harden(setup["tests"], names) if setup["tests"].strip() else None
    program_source = setup["program"]
    del setup
    pristine = dict(builtins.__dict__)
    run, write, leave, settrace, setprofile = exec, os.write, os._exit, sys.settrace, sys.setprofile
    helpers = {names["compare"]: _compare, names["truth"]: _truth}
    streams = (sys.stdout, sys.stderr)

    def fail(code: int) -> None:
        _flush(streams)
        leave(code)

    import types

    runner = sys.modules["__main__"]  # kept alive: our functions' globals live in its dict
    module = types.ModuleType("__main__")
    module.__file__ = program_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [program_path]
    try:
        program = compile(program_source, program_path, "exec", dont_inherit=True)
        del program_source
        run(program, module.__dict__)
        if tests is not None:
            settrace(None)
            setprofile(None)
            scope = module.__dict__
            scope["__builtins__"] = dict(pristine)  # a program that patched print, len or abs patched its own copy
            scope.update(helpers)
            run(tests, scope)
    except SystemExit:
        raise  # an exit before the end (of any status): the token is never written
    except BaseException as error:
        _print_error(error)
        fail(1)
    _flush(streams)
    write(proof_fd, token)
    del runner
    leave(0)


def _print_error(error: BaseException) -> None:
    import traceback

    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # the runner's own frames
        tb = tb.tb_next
    traceback.print_exception(type(error), error, tb)


def _flush(streams) -> None:
    for stream in streams:
        try:
            stream.flush()
        except BaseException:
            pass


def _harden(source: str, names: dict):
    """The tests compiled with every comparison and truth test routed through _compare and _truth."""
    import ast

    symbols = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
               ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}

    def call(name: str, args: list) -> ast.Call:
        return ast.Call(func=ast.Name(id=names[name], ctx=ast.Load()), args=args, keywords=[])

    def truth(node):
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[truth(value) for value in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ast.UnaryOp(op=node.op, operand=truth(node.operand))
        return call("truth", [node])

    class Harden(ast.NodeTransformer):
        def visit_Compare(self, node):
            self.generic_visit(node)
            ops = tuple(symbols[type(op)] for op in node.ops)
            if all(op in ("is", "is not") for op in ops):
                return node
            return call("compare", [ast.Constant(ops), node.left, *node.comparators])

        def _test(self, node):
            self.generic_visit(node)
            node.test = truth(node.test)
            return node

        visit_Assert = visit_If = visit_While = visit_IfExp = _test

        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            if isinstance(node.op, ast.Not):
                node.operand = call("truth", [node.operand])
            return node

    tree = ast.fix_missing_locations(Harden().visit(ast.parse(source, "<tests>")))
    return compile(tree, "<tests>", "exec", dont_inherit=True)


_OPAQUE = object()  # a value that is not plain data
# Looked up by id(): `kind in {int, ...}` would hash and compare `kind`, which a metaclass can answer for.
_SCALARS = {id(kind) for kind in (int, float, complex, str, bytes, bool, type(None))}
_CONTAINERS = {id(kind): kind for kind in (list, tuple, set, frozenset, collections.deque)}
# A subclass of a scalar is read through its base's own conversion, which returns the exact base type.
_CONVERT = {int: int.__int__, float: float.__float__, complex: complex.__complex__, str: str.__str__,
            bytes: bytes.__bytes__}
_OPERATORS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
              ">=": operator.ge, "in": operator.contains, "not in": operator.contains,
              "is": operator.is_, "is not": operator.is_not}


def _plain(value, depth: int = 0):
    """`value` as exact builtin types read by C methods (so no program code runs), or _OPAQUE."""
    kind = type(value)
    if id(kind) in _SCALARS:
        return value
    if depth > 200:
        return _OPAQUE
    try:
        if id(kind) in _CONTAINERS:
            items = [_plain(item, depth + 1) for item in kind.__iter__(value)]
            return _OPAQUE if any(item is _OPAQUE for item in items) else kind(items)
        if kind is dict:  # (identity: `is` cannot be overridden)
            pairs = [(_plain(key, depth + 1), _plain(item, depth + 1)) for key, item in dict.items(value)]
            return _OPAQUE if any(k is _OPAQUE or v is _OPAQUE for k, v in pairs) else dict(pairs)
        for base, convert in _CONVERT.items():  # a Counter, a namedtuple, a program's `class Evil(int)`
            if issubclass(kind, base):
                return convert(value)
        for base in (*_CONTAINERS.values(), dict):
            if issubclass(kind, base):
                return _plain(base(dict.items(value) if base is dict else base.__iter__(value)), depth + 1)
    except Exception:  # a type that lies about its base (a metaclass's mro(), a __class__ property)
        return _OPAQUE
    return _OPAQUE


def _compare(ops: tuple, *operands):
    """The comparison chain `operands[0] ops[0] operands[1] ...` on plain data (module docstring)."""
    plain = [_plain(operand) for operand in operands]
    result = True
    for index, op in enumerate(ops):
        left, right = plain[index], plain[index + 1]
        if op in ("is", "is not"):
            left, right = operands[index], operands[index + 1]
        elif left is _OPAQUE and right is _OPAQUE:  # nothing plain to hold on to: their own operators
            left, right = operands[index], operands[index + 1]
        elif left is _OPAQUE or right is _OPAQUE:
            if op not in ("==", "!="):
                raise TypeError(f"the tests compare ({op}) an object that is not plain data: "
                                f"{type(operands[index]).__name__} and {type(operands[index + 1]).__name__}")
            result = op == "!="  # an object of the program's own is never equal to plain data
            if not result:
                return False
            continue
        if op in ("in", "not in"):
            result = _OPERATORS[op](right, left) == (op == "in")
        else:
            result = _OPERATORS[op](left, right)
        if len(ops) > 1 and not _truth(result):
            return False
    return result


def _truth(value) -> bool:
    plain = _plain(value)
    if plain is _OPAQUE:
        raise TypeError(f"the tests take the truth of an object that is not plain data: {type(value).__name__}")
    return bool(plain)


if __name__ == "__main__":
    main()
