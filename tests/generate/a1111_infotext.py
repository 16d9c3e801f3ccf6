"""A reader of AUTOMATIC1111's infotext (the PNG `parameters` chunk), written from its documented
format, to check what sdtune writes the way A1111's "PNG Info" tab and civitai read it.

The format (A1111's `parse_generation_parameters`):
- the last line holds the `key: value` pairs, separated by ", "; it counts as such only if at
  least 3 pairs are found in it (else it is one more prompt line);
- a key starts with a word character and holds word characters, spaces, `-` and `/`;
- a value is either a JSON string in double quotes (so it may hold commas, colons and escaped
  newlines) or runs up to the next comma;
- the lines before it are the prompt, each stripped; from a line starting with
  `Negative prompt:` on, the lines are the negative prompt;
- a value of the form `<int>x<int>` (Size) is split into `<key>-1` and `<key>-2`.
"""

from __future__ import annotations

import json
import re

_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE = "Negative prompt:"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parse_infotext(text: str) -> dict[str, str]:
    """`Prompt`, `Negative prompt` and every field of the last line, as A1111 reads them."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = _unquote(value)
        size = _SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
    return fields
