"""`opd report`: the page of a real tiny single-teacher run and a real tiny multi-teacher run, loaded in headless
Chromium (Debian's package, installed by scripts/setup.sh); without chromium these tests fail, they do not skip.

The page's script appends `#opd-report-ready` only when it ran to its end without an error, and
`#opd-report-error` otherwise; the DOM Chromium dumps after running it is checked for one plot per metric
group, every logged metric in a legend, a sample view per domain, and token spans coloured by lT - lS.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import PROMPTS, make_config
from PIL import Image, ImageStat

from opd.cli import main
from opd.report import write_report
from opd.report.token_html import NEGATIVE, POSITIVE
from opd.runtime.monitor import read_metrics
from opd.train import train

INJECTION = "</script><script>document.documentElement.setAttribute('data-pwned', 'script')</script>"
IMAGE_INJECTION = "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned', 'img')\">"


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium is not on PATH: scripts/setup.sh installs it (apt-get install chromium)"
    return path


def browse(page: Path, tmp_path: Path, *arguments: str) -> str:
    """Chromium headless on the page (a fresh profile each time: parallel runs must not share one)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                             *arguments, page.as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Elements(HTMLParser):
    """Every start tag of a document as (tag, attributes)."""

    def __init__(self, text: str):
        super().__init__()
        self.found: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))

    def with_class(self, name: str) -> list[dict]:
        return [attrs for _, attrs in self.found if name in (attrs.get("class") or "").split()]


def _rgb(style: str) -> tuple[int, int, int]:
    match = re.search(r"background:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", style)
    assert match, style
    return tuple(int(part) for part in match.groups())


@pytest.fixture(scope="module")
def single_run(model_dir, tmp_path_factory) -> Path:
    """One teacher, one domain; TrOPD with guidance prefixes (trust, outlier and guidance metrics)."""
    root = tmp_path_factory.mktemp("report-single")
    prompts = root / "math.jsonl"
    prompts.write_text("".join(json.dumps({**row, "domain": "math"}) + "\n" for row in PROMPTS))
    train(make_config(model_dir, prompts, root / "run", teachers=[{"domain": "math", "path": str(model_dir / "teacher")}],
                      objective={"name": "tropd", "lam": 1.0, "guidance": {"enabled": True}},
                      train={"steps": 3, "log_samples_every": 1}))
    return root / "run"


@pytest.fixture(scope="module")
def multi_run(model_dir, prompts_file, tmp_path_factory) -> Path:
    """Two teachers (math, code), G-OPD."""
    run_dir = tmp_path_factory.mktemp("report-multi") / "run"
    train(make_config(model_dir, prompts_file, run_dir, train={"steps": 3, "log_samples_every": 1}))
    return run_dir


def check_page(run_dir: Path, tmp_path: Path, expected_groups: set[str], domains: set[str]) -> Elements:
    """The report of run_dir in Chromium: script finished, groups, legends, domains, coloured tokens, pixels."""
    page = write_report(run_dir)
    text = page.read_text()
    assert not re.search(r"\b(?:src|href)\s*=|<link|@import|url\(", text)  # self-contained: loads nothing
    assert set(re.findall(r"https?://[^\s\"']+", text)) <= {"http://www.w3.org/2000/svg"}  # only SVG's namespace
    dom = browse(page, tmp_path, "--dump-dom")
    assert 'id="opd-report-error"' not in dom, re.search(r'id="opd-report-error">[^<]*', dom).group(0)
    assert 'id="opd-report-ready"' in dom
    elements = Elements(dom)
    groups = [attrs["data-group"] for attrs in elements.with_class("plot")]
    assert len(groups) == len(set(groups))  # one plot per group
    assert expected_groups <= set(groups), expected_groups - set(groups)
    for figure in dom.split('<figure class="plot"')[1:]:  # every plot draws its values
        figure = figure.split("</figure>", 1)[0]
        assert "<svg" in figure and ("<polyline" in figure or "<circle" in figure), figure[:200]
    logged = {key for record in read_metrics(run_dir / "metrics.jsonl") for key in record if key != "step"}
    legend = {key for attrs in elements.with_class("plot") for key in json.loads(attrs["data-points"])}
    assert legend == logged  # every logged metric is drawn, in exactly the plots the page lists
    assert {attrs["data-domain"] for attrs in elements.with_class("sample-domain")} == domains
    coloured = [attrs for attrs in elements.with_class("tok") if "data-delta" in attrs]
    assert coloured
    for attrs in coloured:  # teacher more likely: blue side; less likely: red side
        red, _, blue = _rgb(attrs["style"])
        value = float(attrs["data-delta"])
        assert (blue > red) if value > 0 else (red > blue) if value < 0 else (red == blue)
    shot = tmp_path / "page.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2000)
    assert ImageStat.Stat(image).stddev[0] > 20  # not a blank page
    assert sum(image.histogram()[:200]) / (1200 * 2000) > 0.02  # a real share of non-white pixels
    return elements


COMMON_GROUPS = {"teacher-kl-k1", "teacher-kl-k3", "response-length", "truncation", "entropy", "grad-norm",
                 "is-weights", "sampler-gap", "perf-seconds", "perf-throughput"}


def test_single_teacher_run_report_renders_in_chromium(single_run, tmp_path):
    elements = check_page(single_run, tmp_path, COMMON_GROUPS | {"implicit-reward-math", "trust", "guidance"},
                          {"math"})
    assert elements.with_class("given")  # guidance prefix tokens are marked


def test_multi_teacher_run_report_has_per_domain_curves_and_samples(multi_run, tmp_path):
    elements = check_page(multi_run, tmp_path, COMMON_GROUPS | {"implicit-reward-math", "implicit-reward-code"},
                          {"math", "code"})
    kl = next(attrs for attrs in elements.with_class("plot") if attrs["data-group"] == "teacher-kl-k1")
    assert set(json.loads(kl["data-points"])) == {"teacher/kl_k1", "teacher/math/kl_k1", "teacher/code/kl_k1"}
    disagreement_lists = [tag for tag, attrs in elements.found if "disagreements" in (attrs.get("class") or "")]
    assert len(disagreement_lists) == 2  # one per domain


def test_sample_text_cannot_inject_markup(multi_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(multi_run, run_dir)
    record = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])
    record["prompt"] = record["response"] = INJECTION
    record["domain"] = IMAGE_INJECTION
    record["tokens"][0]["text"] = INJECTION
    record["tokens"][1]["text"] = IMAGE_INJECTION
    with (run_dir / "samples.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    dom = browse(write_report(run_dir), tmp_path, "--dump-dom")
    assert "data-pwned" not in dom.split("<body", 1)[0]  # neither script nor handler ran
    assert 'id="opd-report-ready"' in dom and 'id="opd-report-error"' not in dom
    assert "&lt;/script&gt;&lt;script&gt;" in dom  # shown as text


def test_cli_writes_and_rewrites_the_report(multi_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(multi_run, run_dir)
    (run_dir / "report.html").write_text("stale")
    main(["report", str(run_dir)])
    assert "opd: report written to" in capsys.readouterr().out
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    elsewhere = tmp_path / "elsewhere.html"
    main(["report", str(run_dir), "--output", str(elsewhere)])
    assert elsewhere.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("setup, message", [
    (lambda folder: None, "does not exist"),
    (lambda folder: folder.mkdir(), "has no metrics.jsonl"),
    (lambda folder: (folder.mkdir(), (folder / "metrics.jsonl").write_text("")), "holds no step yet"),
    (lambda folder: (folder.mkdir(), (folder / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')),
     "line 2 is not a metrics record"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, setup, message):
    folder = tmp_path / "run"
    setup(folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(folder)])
    text = str(exit_info.value.code)
    assert text.startswith("opd: ") and message in text and "\n" not in text


def test_output_inside_the_run_folder_must_keep_the_run_name(multi_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(multi_run, run_dir)
    with pytest.raises(SystemExit, match="must be named report.html"):
        main(["report", str(run_dir), "--output", str(run_dir / "mine.html")])


def test_the_colour_scale_diverges_around_zero():
    from opd.report.token_html import colour

    assert colour(0.0, 1.0) == "rgb(255, 255, 255)"
    assert colour(5.0, 1.0) == "rgb({}, {}, {})".format(*POSITIVE)  # saturated beyond the scale
    assert colour(-1.0, 1.0) == "rgb({}, {}, {})".format(*NEGATIVE)


def _token(text: str, lT: float, lS: float) -> dict:
    return {"id": 1, "text": text, "lS": lS, "lOld": lS, "lT": lT, "lR": lS, "from_teacher": False,
            "advantage": lT - lS, "trust_probability": None, "outlier": None}


def _long_run(run_dir: Path) -> None:
    """A 1000-step run's files: a grad-norm spike, a nan, an eval every 100 steps; samples every 10 steps,
    5 per domain and step (one over the cap), one response over the token cap, one huge disagreement at a
    step the token views leave out."""
    run_dir.mkdir()
    lines = []
    for step in range(1, 1001):
        lines.append({"step": step, "loss": "nan" if step == 10 else 1.0 / step,
                      "optim/grad_norm": 100.0 if step == 537 else 1.0 + (step % 7) * 0.01,
                      "eval/gsm8k/avg_at_k": step / 1000 if step % 100 == 0 else None})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = []
    for step in range(10, 1001, 10):
        for domain in ("math", "code"):
            for index in range(5):
                length = 1600 if (step, domain, index) == (1000, "code", 0) else 40
                tokens = [_token(f"t{position}", -1.0 + 0.01 * position, -1.0) for position in range(length)]
                if (step, domain, index) == (20, "math", 0):
                    tokens[5] = _token("HUGE", 0.0, -9.0)
                samples.append({"step": step, "domain": domain, "prompt_index": index, "prompt": "p",
                                "response": "r", "truncated": False, "reward": None, "tokens": tokens})
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))


def test_a_long_run_stays_usable_and_says_what_was_capped(tmp_path):
    from opd.report.groups import MAX_POINTS
    from opd.report.samples_view import MAX_SAMPLE_STEPS, MAX_SAMPLES_PER_STEP, MAX_TOKENS_PER_SAMPLE

    run_dir = tmp_path / "run"
    _long_run(run_dir)
    dom = browse(write_report(run_dir), tmp_path, "--dump-dom")
    assert 'id="opd-report-ready"' in dom and 'id="opd-report-error"' not in dom
    assert len(dom) < 3_000_000
    elements = Elements(dom)
    plots = {attrs["data-group"]: json.loads(attrs["data-points"]) for attrs in elements.with_class("plot")}
    grad_norm = plots["grad-norm"]["optim/grad_norm"]
    assert len(grad_norm) <= MAX_POINTS and [537, 100.0] in grad_norm  # downsampled, the spike kept
    assert len(plots["eval"]["eval/gsm8k/avg_at_k"]) == 10  # nulls are gaps, not zeros
    eval_figure = dom.split('data-group="eval"', 1)[1].split("</figure>", 1)[0]
    assert eval_figure.count("<circle") == 10  # sparse values drawn as markers
    assert "loss: 1 non-finite value(s), not drawn (steps 10)" in dom
    assert "optim/grad_norm: 1000 values drawn as" in dom
    shown = {int(attrs["data-step"]) for attrs in elements.with_class("sample")}
    assert len(shown) == MAX_SAMPLE_STEPS and {10, 1000} <= shown and 20 not in shown
    assert "100 steps logged samples; the token views show 12 of them" in dom
    assert len(elements.with_class("sample")) == MAX_SAMPLE_STEPS * 2 * MAX_SAMPLES_PER_STEP
    assert f"at most {MAX_SAMPLES_PER_STEP} per domain and step" in dom
    assert f"1 response(s) shown up to their first {MAX_TOKENS_PER_SAMPLE} tokens" in dom
    math_list = dom.split('data-domain="math"', 1)[1].split("</ol>", 1)[0]
    first = math_list.split("<li>")[1]
    assert "step 20, prompt 0" in first and ">HUGE<" in first  # the lists cover steps the views leave out


def test_a_broken_samples_line_is_named_and_a_torn_last_line_is_left_out(multi_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(multi_run, run_dir)
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    (run_dir / "samples.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "domain": "ma')  # a run still writing
    page = write_report(run_dir).read_text()
    assert 'data-step="4"' not in page and 'data-step="3"' in page
    (run_dir / "samples.jsonl").write_text("\n".join([lines[0], '{"step": 1, "domain": "math"}', *lines[1:]]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir)])
    assert "samples.jsonl: line 2 is not a sample record (missing or wrong: tokens, prompt)" in str(exit_info.value.code)


def test_every_key_lands_in_exactly_one_group_with_a_safe_slug():
    from opd.report.groups import group_metrics

    keys = ["loss", "teacher/kl_k1", 'teacher/"x<y"/kl_k1', 'reward/"x<y"/implicit_mean', "reward/math/implicit_p99",
            "tropd/is_weight_mean", "grpo/is_truncated_fraction", "opd/is_weight_max", "rollout/sampler_gap_max",
            "perf/score_seconds", "async/staleness_mean", "async/staleness_max", "perf/engine_busy_fraction",
            "perf/trainer_wait_seconds",
            "brand_new/thing"]
    groups = group_metrics(keys)
    assert sorted(key for group in groups for key in group.keys) == sorted(keys)
    slugs = {group.slug: group.keys for group in groups}
    assert slugs["implicit-reward-math"] == ("reward/math/implicit_p99",)
    assert slugs["implicit-reward-_x_y_"] == ('reward/"x<y"/implicit_mean',)
    assert slugs["teacher-kl-k1"] == ('teacher/"x<y"/kl_k1', "teacher/kl_k1")
    assert slugs["is-weights"] == ("grpo/is_truncated_fraction", "opd/is_weight_max", "tropd/is_weight_mean")
    assert slugs["sampler-gap"] == ("rollout/sampler_gap_max",)
    order = [group.slug for group in groups]
    assert order.index("sampler-gap") == order.index("is-weights") + 1  # read beside the IS weights
    assert slugs["staleness"] == ("async/staleness_max", "async/staleness_mean")
    assert slugs["engine-busy"] == ("perf/engine_busy_fraction",)
    assert slugs["perf-seconds"] == ("perf/score_seconds", "perf/trainer_wait_seconds")
    assert slugs["other-brand_new"] == ("brand_new/thing",) and slugs["other-loss"] == ("loss",)


# Appended to a copy of the page: what a reader's mouse and the step selector would do, with the outcome
# written into the DOM for --dump-dom to show.
INTERACTION = """<script>
var figure = document.querySelector('.plot[data-group="grad-norm"]'), svg = figure.querySelector("svg");
var rect = svg.getBoundingClientRect();
var userX = LEFT + 0.2 * (WIDTH - LEFT - RIGHT);  // a fifth into the plotted steps
svg.dispatchEvent(new MouseEvent("mousemove", {clientX: rect.left + userX / WIDTH * rect.width, clientY: rect.top + 20,
                                               bubbles: true}));
var select = document.getElementById("step-select");
select.value = select.options[select.options.length - 1].value;
select.dispatchEvent(new Event("change"));
var shown = Array.from(document.querySelectorAll(".sample")).filter(function (card) { return card.style.display !== "none"; });
var out = document.createElement("pre");
out.id = "interaction";
out.textContent = JSON.stringify({readout: figure.querySelector(".readout").textContent, step: select.value,
  shown: shown.map(function (card) { return card.getAttribute("data-step"); })});
document.body.appendChild(out);
</script>"""


def test_hover_reads_out_values_and_the_step_selector_filters_samples(multi_run, tmp_path):
    page = tmp_path / "page.html"
    from opd.report.plots import LEFT, RIGHT, WIDTH

    script = INTERACTION.replace("LEFT", str(LEFT)).replace("RIGHT", str(RIGHT)).replace("WIDTH", str(WIDTH))
    page.write_text(write_report(multi_run, tmp_path / "report.html").read_text().replace("</body>", script + "</body>"))
    dom = browse(page, tmp_path, "--dump-dom", "--window-size=1200,2000")
    assert 'id="opd-report-error"' not in dom
    outcome = json.loads(html.unescape(re.search(r'<pre id="interaction">(.*?)</pre>', dom).group(1)))
    records = read_metrics(multi_run / "metrics.jsonl")
    steps = [record["step"] for record in records]
    under_mouse = steps[0] + 0.2 * (steps[-1] - steps[0])
    nearest = min(records, key=lambda record: abs(record["step"] - under_mouse))
    value, step = re.fullmatch(r"optim/grad_norm = (\S+)  \(step (\d+)\)", outcome["readout"]).groups()
    assert int(step) == nearest["step"] and float(value) == pytest.approx(nearest["optim/grad_norm"], rel=1e-3)
    assert outcome["shown"] and set(outcome["shown"]) == {outcome["step"]}


def test_a_run_without_samples_says_so_and_still_loads(multi_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(multi_run, run_dir)
    (run_dir / "samples.jsonl").unlink()
    dom = browse(write_report(run_dir), tmp_path, "--dump-dom")
    assert 'id="opd-report-ready"' in dom and 'id="opd-report-error"' not in dom
    assert "No samples.jsonl: this run logged no samples (train.log_samples_every: 0)" in dom
    assert 'class="sample"' not in dom and 'class="plot"' in dom
