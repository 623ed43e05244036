"""The samples' HTML: token spans coloured by lT - lS on a diverging scale, sample cards, the per-domain list
of the largest disagreements, and the colour legend.

Every piece of text that comes from samples.jsonl (prompts, token texts, domain names) goes through
`html.escape` with quotes, in element text and in attributes alike: a response is model output and may hold
`</script>` or `<img onerror=...>`.
"""

from __future__ import annotations

import html

from opd.report.samples_view import Disagreement, SampleViews, delta

# lT - lS > 0: the teacher likes the token more than the student does (blue); < 0: less (red).
POSITIVE = (33, 102, 172)
NEGATIVE = (178, 24, 43)
WHITE = (255, 255, 255)
# The token values shown in each token's title, in order.
VALUE_NAMES = ("lT", "lS", "lOld", "lR", "advantage", "trust_probability", "outlier", "from_teacher")


def colour(value: float, scale: float) -> str:
    """The background of a token with lT - lS = `value`: white at 0, saturated at +-`scale` and beyond."""
    share = max(-1.0, min(1.0, value / scale))
    end = POSITIVE if share > 0 else NEGATIVE
    mixed = (round(white + (extreme - white) * abs(share)) for white, extreme in zip(WHITE, end))
    return "rgb({}, {}, {})".format(*mixed)


def _text_colour(value: float, scale: float) -> str:
    return "#fff" if abs(value) > 0.6 * scale else "#111"  # dark backgrounds take light text


def visible(text: str) -> str:
    """A token's text with its whitespace made visible (a newline token would otherwise be invisible)."""
    return text.replace("\n", "\u21b5\n").replace("\t", "\u21e5\t") or "\u2205"


def token_title(token: dict) -> str:
    value = delta(token)
    lines = [f"token {token.get('text', '')!r} (id {token.get('id')})",
             "lT - lS = " + ("n/a (no teacher value)" if value is None else f"{value:+.4f}")]
    for name in VALUE_NAMES:
        entry = token.get(name)
        lines.append(f"{name} = {'null' if entry is None else f'{entry:.4f}' if isinstance(entry, float) else entry}")
    return "\n".join(lines)


def token_span(token: dict, scale: float) -> str:
    value = delta(token)
    classes = ["tok"] + (["given"] if token.get("from_teacher") else []) + (["outlier"] if token.get("outlier") else [])
    if value is None:
        classes.append("no-teacher")
        style, data = "", ""
    else:
        style = f' style="background:{colour(value, scale)};color:{_text_colour(value, scale)}"'
        data = f' data-delta="{value:.6g}"'
    return (f'<span class="{" ".join(classes)}"{style}{data} title="{html.escape(token_title(token))}">'
            f"{html.escape(visible(str(token.get('text', ''))))}</span>")


def sample_card(record: dict, scale: float) -> str:
    reward = record.get("reward")
    facts = [f"step {record['step']}", f"prompt {record.get('prompt_index', '?')}",
             f"{len(record['tokens'])} tokens", "reward " + ("n/a" if reward is None else f"{reward:.3g}")]
    if record.get("truncated"):
        facts.append("truncated at max_new_tokens")
    if record.get("cut"):
        facts.append("shown cut (too long)")
    tokens = "".join(token_span(token, scale) for token in record["tokens"])
    return (f'<article class="sample" data-step="{int(record["step"])}">'
            f'<header>{html.escape(" · ".join(facts))}</header>'
            f'<details><summary>prompt</summary><pre>{html.escape(record["prompt"])}</pre></details>'
            f'<div class="tokens">{tokens}</div></article>')


def disagreement_list(items: list[Disagreement], scale: float) -> str:
    if not items:
        return '<p class="note">no token of this domain has both lT and lS (no teacher values logged)</p>'
    rows = []
    for item in items:
        token = item.token
        rows.append(
            f'<li><span class="where">step {item.step}, prompt {item.prompt_index}</span> '
            f'<span class="context">{html.escape(visible(item.before))}</span>{token_span(token, scale)}'
            f'<span class="context">{html.escape(visible(item.after))}</span> '
            f'<span class="values">lT {token["lT"]:.3f} · lS {token["lS"]:.3f} · lT - lS {item.delta:+.3f}</span></li>')
    return f'<ol class="disagreements">{"".join(rows)}</ol>'


def legend(scale: float) -> str:
    """A gradient bar from -scale to +scale with its labels, and the token markers' meaning."""
    stops = ", ".join(colour(scale * share / 4, scale) for share in range(-4, 5))
    return (f'<div class="colour-legend"><span>lT - lS = {-scale:.3g} or less (teacher less likely)</span>'
            f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
            f'<span>{scale:.3g} or more (teacher more likely)</span></div>'
            '<p class="note">Colour: teacher log-prob minus student log-prob of each response token; white is '
            f'agreement, saturation at |lT - lS| = {scale:.3g} (the 98th percentile of the tokens shown). '
            'Grey: no teacher value. Underlined: a token given by the teacher (guidance prefix), not sampled. '
            'Boxed: a TrOPD outlier. Hover a token for all its values.</p>')


def domain_section(domain: str, views: SampleViews) -> str:
    """One domain's block: its disagreement list, then its sample cards of every shown step."""
    cards = "".join(sample_card(record, views.scale) for record in views.records if record["domain"] == domain)
    return (f'<section class="sample-domain" data-domain="{html.escape(domain)}">'
            f'<h3>domain {html.escape(domain)}</h3>'
            f'<h4>largest teacher-student disagreements (|lT - lS|, every logged step)</h4>'
            f'{disagreement_list(views.disagreements.get(domain, []), views.scale)}'
            f'<h4>samples</h4><div class="samples">{cards}</div></section>')
