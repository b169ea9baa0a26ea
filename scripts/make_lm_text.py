"""Write a small language-modelling dataset from text every Python install has: the
docstrings of the standard library, as ``train.txt`` and ``test.txt`` (one paragraph
per line, 90 / 10 by module), so the causal-LM path runs offline:

    python scripts/make_lm_text.py outputs/lm_text
    pruneflow model=tiny_llama task=lm/wikitext2 task.path=outputs/lm_text \\
        calibration.dataset=wikitext2 method=wanda

The text is real English prose about Python (it varies a little between Python
versions), not WikiText-2: perplexities on it test
the machinery, they are not comparable with published ones.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import sys
import warnings
from pathlib import Path


def paragraphs() -> dict[str, list[str]]:
    """Docstring paragraphs per standard-library module, in module-name order."""
    out: dict[str, list[str]] = {}
    warnings.simplefilter("ignore")  # deprecated modules warn on import
    # importing these has side effects (a web browser, printing, a GUI)
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "pydoc_data"}
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skip)
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        docs = [mod.__doc__ if isinstance(mod.__doc__, str) else ""]
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if getattr(obj, "__module__", None) == name and isinstance(doc, str):
                docs.append(doc)
        paras = []
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text) > 40 and not text.startswith((">>>", "$")):
                    paras.append(text)
        if paras:
            out[name] = paras
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    args = p.parse_args()
    train, test = [], []
    for name, paras in paragraphs().items():
        # a fixed split by module name: the same files on every machine with this Python
        (test if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0 else train).extend(paras)
    args.folder.mkdir(parents=True, exist_ok=True)
    (args.folder / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (args.folder / "test.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    words = sum(len(t.split()) for t in train), sum(len(t.split()) for t in test)
    print(f"{args.folder}: train.txt {len(train)} paragraphs ({words[0]} words), test.txt {len(test)} paragraphs ({words[1]} words)")


if __name__ == "__main__":
    main()
