"""Prompt templates: files under `paths.prompts_dir()` with `$var` placeholders (`string.Template`).

A template may be split into chat roles by marker lines `[[system]]`, `[[user]]` and `[[assistant]]`;
the `[[assistant]]` section, when present, is the start of the model's answer (e.g. `Answer: (`), which
the model continues. A template without markers is plain text (used for fixed, non-LLM sentences). A file of many short sentences
(the chat's replies) is split into named sections by `[name]` lines and read with `load_sections`: each
section is one `Prompt` of its own.
Every template's `sha256` (of its file text) is recorded with model outputs and in adapter metadata.

`sanitize()` is the one place where user or catalog text is made safe to put into a prompt.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from recllm import paths
from recllm.errors import PromptError

ROLES = ("system", "user", "assistant")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_MARKER_RE = re.compile(r"^\[\[(system|user|assistant)\]\][ \t]*$", re.MULTILINE)
_SECTION_RE = re.compile(r"^\[([a-z0-9][a-z0-9_\-]*)\][ \t]*$")

# What sanitize() removes or rewrites in text inserted into a prompt.
# control, line/paragraph separator, bidi, zero-width and other invisible characters
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_ROLE_TAG_RE = re.compile(
    r"<\|[^|<>]{0,40}\|>"  # ChatML / Llama-3 special tokens: <|im_start|>, <|eot_id|>, <|endoftext|>
    r"|</?[A-Za-z][\w-]{0,40}>"  # tag-like tokens: <s>, </s>, <file_sep>, <start_of_turn> (SmolLM2, Gemma, ...)
    r"|\[/?(?:INST|SYSTEM_PROMPT|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS)\]|<</?SYS>>"  # Llama-2 / Mistral
    r"|\[\[\s*(?:system|user|assistant)\s*\]\]",  # our own role markers
    re.IGNORECASE,
)
_OPTION_RE = re.compile(r"\(([A-Z])\)")  # "(B)" in a title would look like a lettered option
_YEAR_SUFFIX_RE = re.compile(r"\s\(\d{4}\)$")
ELLIPSIS = "..."


def sanitize(text: object, max_chars: int | None = None) -> str:
    """Make user or catalog text safe to insert into a prompt, as one line.

    Control, zero-width and bidi characters and newlines become spaces, chat role tags and tag-like special
    tokens (`<|im_start|>`, `[INST]`, `</s>`, `<file_sep>`, `[[user]]`, ...) are removed, whitespace is collapsed,
    option-like `(A)` becomes `[A]`, and the text is cut to `max_chars` (keeping a trailing " (1995)" year when
    there is one).
    """
    value = "" if text is None else str(text)
    previous = None
    while previous != value:  # removing one tag must not leave another one behind
        previous = value
        value = " ".join(_ROLE_TAG_RE.sub(" ", _CONTROL_RE.sub(" ", value)).split())
    value = _OPTION_RE.sub(r"[\1]", value)
    if max_chars is not None and len(value) > max_chars:
        year = _YEAR_SUFFIX_RE.search(value)
        suffix = year.group(0) if year and max_chars > len(year.group(0)) + len(ELLIPSIS) + 4 else ""
        body = value[: len(value) - len(suffix)] if suffix else value
        keep = max(0, max_chars - len(suffix) - len(ELLIPSIS))
        value = body[:keep].rstrip() + ELLIPSIS + suffix
    return value


def has_role_tag(text: object) -> bool:
    """True when `text` holds something `sanitize` removes as a chat role tag or special token."""
    return bool(_ROLE_TAG_RE.search("" if text is None else str(text)))


@dataclass(frozen=True)
class Prompt:
    """One template file. `variables` are the `$names` it uses; `sha256` identifies its exact text."""

    name: str
    text: str
    path: Path | None = None
    sha256: str = field(init=False)
    variables: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        template = string.Template(self.text)
        if not template.is_valid():
            raise PromptError(f"Prompt '{self.name}' has an invalid placeholder (write $$ for a literal $)")
        object.__setattr__(self, "sha256", hashlib.sha256(self.text.encode("utf-8")).hexdigest())
        object.__setattr__(self, "variables", frozenset(template.get_identifiers()))

    @property
    def has_roles(self) -> bool:
        """True when the template is split into `[[system]]` / `[[user]]` / `[[assistant]]` sections."""
        return bool(_MARKER_RE.search(self.text))

    def check(self, values: dict) -> None:
        """Raise PromptError when `values` misses a variable of the template or has one it does not use."""
        missing = sorted(self.variables - set(values))
        unknown = sorted(set(values) - self.variables)
        if missing:
            raise PromptError(f"Prompt '{self.name}': Missing variables: {', '.join(missing)}")
        if unknown:
            raise PromptError(f"Prompt '{self.name}': Unknown variables: {', '.join(unknown)}")

    def render(self, **values: object) -> str:
        """The whole template with every `$var` substituted (values are inserted verbatim: sanitize first)."""
        self.check(values)
        text = string.Template(self.text).substitute({k: str(v) for k, v in values.items()})
        return text[:-1] if text.endswith("\n") else text

    def messages(self, **values: object) -> list[dict[str, str]]:
        """Render into chat messages `[{"role", "content"}]`, one per section (plain text = one user message).

        A final `assistant` message is the beginning of the answer the model continues.
        """
        self.check(values)
        subst = {k: str(v) for k, v in values.items()}
        if not self.has_roles:
            return [{"role": "user", "content": self.render(**values)}]
        parts = _MARKER_RE.split(self.text)
        if parts[0].strip():
            raise PromptError(f"Prompt '{self.name}' has text before its first [[role]] marker")
        out = []
        for role, body in zip(parts[1::2], parts[2::2]):
            body = body.strip("\n")
            content = string.Template(body).substitute(subst)
            out.append({"role": role, "content": content})
        if any(m["role"] == "assistant" for m in out[:-1]):
            raise PromptError(f"Prompt '{self.name}': [[assistant]] may only be the last section")
        return out


def prompt_path(name: str) -> Path:
    """The file of template `name` (`<prompts dir>/<name>.txt`)."""
    if not _NAME_RE.match(name or ""):
        raise PromptError(f"Invalid prompt name {name!r}: use lower-case letters, digits, '_' or '-'")
    return paths.prompts_dir() / f"{name}.txt"


_TEXTS: dict[Path, tuple[tuple[int, int], str]] = {}  # path -> ((mtime_ns, size), text): read again once changed


def _read(path: Path) -> str:
    try:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = _TEXTS.get(path)
        if cached is None or cached[0] != stamp:
            cached = _TEXTS[path] = (stamp, path.read_text(encoding="utf-8"))
        return cached[1]
    except FileNotFoundError:
        raise PromptError(f"Prompt template not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"Cannot read prompt template {path}: {exc}") from None


def load_prompt(name: str, variables: set[str] | frozenset[str] | tuple[str, ...] | None = None) -> Prompt:
    """Read template `name`; when `variables` is given, the template must use exactly those (PromptError)."""
    path = prompt_path(name)
    prompt = Prompt(name=name, text=_read(path), path=path)
    if variables is not None:
        expected = frozenset(variables)
        if prompt.variables != expected:
            missing = sorted(expected - prompt.variables)
            unknown = sorted(prompt.variables - expected)
            detail = "; ".join(
                part
                for part in (
                    f"missing: {', '.join(missing)}" if missing else "",
                    f"unknown: {', '.join(unknown)}" if unknown else "",
                )
                if part
            )
            raise PromptError(f"Prompt template {path} must use ${', $'.join(sorted(expected))} ({detail})")
    return prompt


def split_sections(text: str) -> dict[str, str]:
    """{section name: its text} of a text split by `[name]` lines. A section runs to the next one, blank lines
    around it removed; lines starting with `#` are comments, and so is everything before the first section."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _SECTION_RE.match(line)
        if match:
            if match.group(1) in sections:
                raise PromptError(f"Section [{match.group(1)}] appears twice")
            current = sections[match.group(1)] = []
        elif current is not None and not line.startswith("#"):
            current.append(line)
    return {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}


def load_sections(name: str) -> dict[str, Prompt]:
    """Template file `name` split by `[section]` lines (`split_sections`): {section: Prompt}. Each prompt is
    named `name:section` and its `sha256` is that of the section's own text."""
    path = prompt_path(name)
    try:
        sections = split_sections(_read(path))
    except PromptError as exc:
        raise PromptError(f"Prompt template {path}: {exc}") from None
    return {section: Prompt(name=f"{name}:{section}", text=body, path=path) for section, body in sections.items()}


def join_and(items: list[str]) -> str:
    """"X", "X and Y", "X, Y and Z" (the conjunction comes from prompts/list_and.txt)."""
    items = [i for i in items if i]
    if len(items) <= 1:
        return items[0] if items else ""
    return load_prompt("list_and", {"head", "last"}).render(head=", ".join(items[:-1]), last=items[-1])
