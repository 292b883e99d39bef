"""Freeze a run's learned recurrent carry (CRAWLER_CARRY=learned) into a preset, as upstream's record froze
its learned coefficients: the float checkpoint's carry_beta / carry_alpha, rounded, become
`CRAWLER_CARRY=frozen:<betas>;<alphas>` in the preset (the line replaced if there is one, else appended).

    python3 scripts/freeze_carry.py logs/<RUN_ID>_model.pt --preset presets/record.env [--decimals 2]

The preset is rewritten through a temp file and a rename. Exit 1 with one line when the checkpoint has no
learned carry or the preset does not exist.
"""
import argparse
import os
import re
import sys

import torch

LINE = re.compile(r'^: "\$\{CRAWLER_CARRY:=[^}]*\}".*$', re.M)


def carry_spec(state, decimals):
    """frozen:<betas>;<alphas> from a model state dict's learned carry tensors (alpha row by row)."""
    if "carry_beta" not in state:
        raise ValueError("the checkpoint has no learned carry (train with CRAWLER_CARRY=learned)")
    fmt = lambda t: ",".join(f"{round(v, decimals):g}" for v in t.flatten().tolist())
    return f"frozen:{fmt(state['carry_beta'])};{fmt(state['carry_alpha'])}"


def write_preset(path, spec, source):
    text = open(path).read()
    line = f': "${{CRAWLER_CARRY:={spec}}}"  # learned by {source}'
    text = LINE.sub(line, text) if LINE.search(text) else text.rstrip("\n") + "\n" + line + "\n"
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="logs/<RUN_ID>_model.pt of a CRAWLER_CARRY=learned run")
    p.add_argument("--preset", required=True, help="presets/<name>.env to write CRAWLER_CARRY into")
    p.add_argument("--decimals", type=int, default=2)
    a = p.parse_args(argv)
    try:
        if not os.path.isfile(a.preset):
            raise ValueError(f"no preset {a.preset}")
        spec = carry_spec(torch.load(a.checkpoint, map_location="cpu")["model"], a.decimals)
        write_preset(a.preset, spec, os.path.basename(a.checkpoint))
    except (ValueError, OSError, KeyError) as e:
        print(f"freeze_carry: error: {a.checkpoint}: {e}", file=sys.stderr)
        return 1
    print(f"{a.preset}: CRAWLER_CARRY={spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
