"""Parsers of the MARS roles' final answers: plan, findings, reflection verdict.

Like `starrec.llm.structured`, each returns a value or raises `ParseError` with a message
the model can act on; analyst names are matched leniently (`Recent-Interest analyst`,
`recent`, `short-term` all mean `recent`, see `aliases` in prompts/roles.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from starrec.agents.prompts import roles
from starrec.core import ParseError

_LINE = re.compile(r"^[\W\d_]*([A-Za-z][A-Za-z _\-]{0,40}?)[\s*`\"']*:\s*(.*)$")


def _key(name: str) -> str:
    return re.sub(r"[^a-z]+", "_", name.lower()).strip("_")


def analyst_name(name: str, analysts: Sequence[str]) -> str | None:
    """The analyst `name` refers to, among `analysts`, or None."""
    key = re.sub(r"_analyst$", "", _key(name))
    for analyst in analysts:
        if key == analyst or key in roles()[analyst].aliases:
            return analyst
    return None


def assignments(text: str, analysts: Sequence[str]) -> dict[str, str]:
    """`name: text` lines naming one of `analysts`, in order (a repeated name's lines are
    joined)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        analyst = analyst_name(match.group(1), analysts)
        if analyst is not None:
            found[analyst] = " ".join(filter(None, [found.get(analyst), match.group(2).strip()]))
    return found


def _names_hint(analysts: Sequence[str]) -> str:
    return ", ".join(analysts)


def parse_plan(text: str, analysts: Sequence[str]) -> dict[str, str]:
    """Analyst -> what to look at. A plan that only mentions analysts (no `name:` lines)
    assigns them with no instruction."""
    found = assignments(text, analysts)
    if not found:
        flat = f"_{_key(text)}_"
        found = {a: "" for a in analysts
                 if any(f"_{name}_" in flat for name in (a, *roles()[a].aliases))}
    if not found:
        raise ParseError(f"the plan names no analyst. Write one line per analyst you need, as "
                         f"`name: what to look at`, with names from: {_names_hint(analysts)}.")
    return found


def parse_findings(text: str) -> str:
    """An analyst's final answer: its text without a made-up tool response after it; a
    small model that only echoes evidence in <tool_response> tags keeps the echo."""
    findings = text.split("<tool_response>")[0].strip() or text
    findings = re.sub(r"</?(?:findings|tool_response)>", "", findings).strip()
    if not findings:
        raise ParseError("the answer is empty. Write your findings: two or three short "
                         "sentences that cite numbers from the tool responses.")
    return findings


@dataclass
class Verdict:
    accept: bool
    revise: dict[str, str] = field(default_factory=dict)  # analyst -> what to fix

    def as_dict(self) -> dict:
        return {"accept": self.accept, "revise": self.revise}


def parse_verdict(text: str, analysts: Sequence[str]) -> Verdict:
    """ACCEPT, or `name: what to fix` lines. An answer that starts with ACCEPT accepts
    even if it goes on; send-back lines win over an ACCEPT further down."""
    if re.match(r"^\W*accept", text, re.I):
        return Verdict(True)
    revise = assignments(text, analysts)
    if revise:
        return Verdict(False, revise)
    if re.search(r"\baccept", text, re.I):
        return Verdict(True)
    raise ParseError(f"answer exactly ACCEPT, or one line per analyst to send back as "
                     f"`name: what to fix`, with names from: {_names_hint(analysts)}.")
