"""Training and evaluation prompts: a list in the config, a prompts file, or a named set.

`prompts:` in a config is
- a list of strings;
- a path to a text file, one prompt per line (blank lines and lines starting with '#' skipped);
- the name of a built-in set (`PROMPT_SETS`): 'animals' (the simple animal names DDPO
  trained on), 'animal-activities' (DDPO's prompt-alignment style: an animal doing something),
  'digits' ('0'..'9').
"""

from __future__ import annotations

from pathlib import Path

ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
           "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
           "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo"]
ACTIVITIES = ["riding a bike", "playing chess", "washing the dishes", "reading a book", "playing the guitar",
              "cooking dinner"]

PROMPT_SETS: dict[str, list[str]] = {
    "animals": ANIMALS,
    "animal-activities": [f"a {a} {act}" for a in ANIMALS[:12] for act in ACTIVITIES],
    "digits": [str(d) for d in range(10)],
}


def resolve_prompts(spec, default: list[str]) -> list[str]:
    """The prompt list a config's `prompts:` value means (None = `default`)."""
    if spec is None:
        if not default:
            raise ValueError("this model has no default prompts: set `prompts:` in the config to a list, a "
                             f"prompts file (one per line) or a set name ({', '.join(PROMPT_SETS)})")
        return list(default)
    if isinstance(spec, (list, tuple)):
        prompts = [str(p) for p in spec]
    elif spec in PROMPT_SETS:
        prompts = list(PROMPT_SETS[spec])
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"prompts {spec!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a file: "
                             "give a list, a text file with one prompt per line, or a set name")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()
                   and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts {spec!r} holds no prompts")
    return prompts
