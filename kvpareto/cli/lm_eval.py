"""`kvpareto lm-eval`: lm-eval's own command line, with the `kvpareto` model registered."""

from __future__ import annotations

import typer


def lm_eval_command(ctx: typer.Context) -> None:
    """lm-eval's own command line with the `kvpareto` model registered (see README).

    Example: kvpareto lm-eval --model kvpareto --model_args model=smollm2-135m,k_bits=4,v_bits=4
    --tasks niah_single_1 --metadata max_seq_lengths=[1024] --limit 5
    """
    from kvpareto.evaluation.lmeval.bridge import main as lm_eval_main

    lm_eval_main(ctx.args)
