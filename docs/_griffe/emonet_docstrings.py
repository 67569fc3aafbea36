"""A griffe extension that lets EmoNet's docstrings render well under the numpy parser.

EmoNet's docstrings use numpy-style sections, but most items put their description on the
same line as the name (``csv_path : path to an annot_arrs CSV.``), where numpydoc expects a
type. Read as written, the description would land in the "Type" column. Before parsing,
this extension rewrites each docstring (in memory only, the source is untouched):

- ``name : description`` items (Parameters, Attributes, Returns) become ``name`` with the
  description on the next, indented line; a real type (``int``, ``array-like of shape
  (n, 26)``, ...) is left where it is;
- ``Error : description`` items under Raises likewise;
- a Returns section written as a paragraph becomes one item typed by the signature;
- a paragraph that follows a Parameters or Raises section goes under a Notes heading;
- Sphinx roles (:func:`~emonet.x.y`, :class:`Predictor`, ...) become optional autorefs:
  a link where the target is documented, plain code where it is not (never a warning).

Loaded from mkdocs.yml (``extensions: [docs/_griffe/emonet_docstrings.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION_DASHES = re.compile(r"^\s*-{3,}\s*$")
_NAMES = r"\*{0,2}[A-Za-z_]\w*(?:, \*{0,2}[A-Za-z_]\w*)*"
_ITEM = re.compile(rf"^(?P<names>{_NAMES})(?: :(?: (?P<rest>.*))?)?$")
_TUPLE_ITEM = re.compile(r"^(?P<names>\([^)]*\)) : (?P<rest>.+)$")
# The first words of a numpy type, as opposed to a description.
_TYPE_START = re.compile(
    r"^(?:\{|array-like\b|ndarray\b|np\.|numpy\.|pandas\.|pd\.|int\b|float\b|str\b|bool\b|dict\b|list\b|"
    r"tuple\b|set\b|sequence\b|iterable\b|mapping\b|callable\b|pair\b|path-like\b|Path\b)"
)
_PROSE = re.compile(r"``|\. |\.$|^The |:\w+:`")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const|ref):`(?P<target>[^`]+)`")
_LITERAL = re.compile(r"(``.+?``)", re.DOTALL)
_ITEM_SECTIONS = {"parameters", "other parameters", "attributes", "raises", "warns", "returns", "yields"}


def _is_type(rest: str, continuation: str | None) -> bool:
    """Whether ``rest`` (after ``name :``) is a numpy type rather than a description."""
    if not _TYPE_START.match(rest):
        return False
    # A type is followed by an indented description that starts a sentence, or by nothing.
    return continuation is None or not continuation[:1].islower()


def _rewrite_item(section: str, lines: list[str]) -> list[str]:
    first, continuation = lines[0], lines[1:]
    next_text = next((line.strip() for line in continuation if line.strip()), None)
    match = _ITEM.match(first)
    if section in {"raises", "warns"}:
        if match and match["rest"]:
            return [match["names"], "    " + match["rest"], *continuation]
        return lines
    if match and match["rest"] and " : " in first:
        rest = match["rest"]
        if _is_type(rest, next_text):
            return lines
        # Returns: "name :" takes the type from the signature; elsewhere the bare name does.
        head = f"{match['names']} :" if section in {"returns", "yields"} else match["names"]
        return [head, "    " + rest, *continuation]
    if section in {"returns", "yields"}:
        tuple_match = _TUPLE_ITEM.match(first)
        if tuple_match:
            return [tuple_match["names"], "    " + tuple_match["rest"], *continuation]
    return lines


def _rewrite_section(section: str, body: list[str]) -> list[str]:
    """Rewrite the lines of one section (without its title and dashes)."""
    if section in {"returns", "yields"}:
        text = [line for line in body if line.strip()]
        if text and _PROSE.search(text[0]) and not _ITEM.match(text[0]) and not _TUPLE_ITEM.match(text[0]):
            # A paragraph: one item, typed from the signature.
            return [":", *("    " + line if line.strip() else "" for line in body)]
    out: list[str] = []
    item: list[str] = []
    notes: list[str] = []
    previous_blank = False
    for line in body:
        if notes:
            notes.append(line)
        elif not line.strip():
            item.append("")
            previous_blank = True
            continue
        elif line.startswith(" "):
            item.append(line)
        elif (
            section in {"parameters", "raises"}
            and (previous_blank or not item)
            and not _ITEM.match(line)
            and not _TUPLE_ITEM.match(line)
        ) or (section == "parameters" and item and not _ITEM.match(line)):
            notes.append(line)
        else:
            if item:
                out.extend(_rewrite_item(section, item))
            item = [line]
        previous_blank = False
    if item:
        trailing = 0
        while item and not item[-1]:
            item.pop()
            trailing += 1
        out.extend(_rewrite_item(section, item))
        out.extend([""] * trailing)
    if notes:
        out.extend(["", "Notes", "-----", *notes])
    return out


def _roles_to_autorefs(text: str, obj: griffe.Object) -> str:
    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        title = None
        if "<" in target and target.endswith(">"):
            title, target = target[:-1].split("<", 1)
            title, target = title.strip(), target.strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        shown = title or (target.rsplit(".", 1)[-1] if short else target)
        identifier = _qualify(target, obj)
        return f'<autoref identifier="{identifier}" optional>`{shown}`</autoref>'

    def plain(match: re.Match[str]) -> str:
        target = match["target"].strip()
        if "<" in target and target.endswith(">"):
            return target.split("<", 1)[0].strip()
        return target.lstrip("~.").rsplit(".", 1)[-1] if target.startswith("~") else target

    # Inside a ``literal`` a role stays text: its target's name only.
    parts = _LITERAL.split(text)
    return "".join(
        _ROLE.sub(plain, part) if index % 2 else _ROLE.sub(replace, part) for index, part in enumerate(parts)
    )


def _qualify(target: str, obj: griffe.Object) -> str:
    """The full path of a relative Sphinx target, looked up from ``obj`` outwards."""
    if target.startswith("emonet"):
        return target
    head = target.split(".", 1)[0]
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            member = scope.members.get(head)
        except Exception:  # noqa: BLE001 - an unresolvable alias: keep looking outwards
            member = None
        if member is not None:
            base = member.target_path if isinstance(member, griffe.Alias) else member.path
            return base + target[len(head) :]
        scope = scope.parent
    return target


def rewrite_docstring(text: str, obj: griffe.Object) -> str:
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        is_title = index + 1 < len(lines) and line.strip() and _SECTION_DASHES.match(lines[index + 1])
        if is_title and line.strip().lower() in _ITEM_SECTIONS:
            section = line.strip().lower()
            out.extend([line, lines[index + 1]])
            end = index + 2
            while end < len(lines) and not (
                end + 1 < len(lines) and lines[end].strip() and _SECTION_DASHES.match(lines[end + 1])
            ):
                end += 1
            out.extend(_rewrite_section(section, lines[index + 2 : end]))
            index = end
            continue
        out.append(line)
        index += 1
    return _roles_to_autorefs("\n".join(out), obj)


class EmonetDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded package before it is parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = rewrite_docstring(obj.docstring.value, obj)
