"""Bit controllers: who decides which tokens of a write get more KV bits, and the width mix.

A controller has two duties. `score(features)` ranks tokens (higher = needs more bits), and
`mix(target)` says what fraction of tokens each width {2, 4, 8, 16} gets so that the mean is
`target_mean_bits`. The adaptive cache (kv/adaptive.py) hands out each write's quota of every
width by rank, widest first.

- `LearnedController` (kv_scheme adaptive), after "Don't Waste Bits!" (arXiv 2604.04722): a
  compact MLP maps the token features (kv/features.py) to the probability of each
  width being the smallest that keeps the layer's attention output error under a threshold (the
  calibration label, see evaluation/controller_training.py). Its score is the expected log2
width. Its mix
  comes from its own scores on the calibration tokens: shift every token's need by one common
  offset until the mean width meets the target (water-filling in log2 bits), so a controller
  that found most tokens cheap spends the budget on a few wide ones.
- `RuleController` (kv_scheme rule), the hand-written baseline: attention sinks (the first 4
  positions) first, then the most recent 32 tokens of each write, then the rest by attention
  received; the top fraction gets 8 bits and the rest 2, the fraction set by the target (8 and 16
  above a mean of 8).

Controller files are `torch.save`d dicts (format "kvpareto-controller", a version, the feature
names, MLP weights, feature standardization, score quantiles). A name resolves to
kvpareto/kv/controllers/NAME.pt; anything else is a path.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kvpareto.errors import UserError
from kvpareto.kv.features import FEATURES

WIDTHS = (2, 4, 8, 16)
FORMAT, VERSION = "kvpareto-controller", 1
SHIPPED = Path(__file__).parent / "controllers"
SINKS, RECENT = 4, 32


class LearnedController:
    """An MLP over standardized features: logits over WIDTHS, score = expected log2 width."""

    def __init__(self, state: dict):
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise UserError(
                f"not a version-{VERSION} kvpareto controller file; retrain it with "
                "kvpareto controller train"
            )
        if tuple(state["features"]) != FEATURES:
            raise UserError(
                f"controller features {state['features']} differ from this build's {FEATURES}; "
                "retrain it with kvpareto controller train"
            )
        self.state = state
        self.mlp = build_mlp(len(FEATURES), state["hidden"])
        self.mlp.load_state_dict(state["weights"])
        self.mlp.eval()

    def score(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.state["mean"]) / self.state["std"]
        with torch.no_grad():
            probs = self.mlp(x).softmax(dim=-1)
        return probs @ torch.log2(torch.tensor(WIDTHS, dtype=torch.float32))

    def mix(self, target: float) -> dict[int, float]:
        return water_fill(self.state["score_quantiles"].tolist(), target)

    def save(self, path: Path | str) -> None:
        torch.save(self.state, path)

    @classmethod
    def load(cls, path: Path | str) -> LearnedController:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise UserError(f"cannot read controller file {path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the unpickler fails in many ways on foreign bytes
            raise UserError(
                f"{path} is not a kvpareto controller file ({type(e).__name__} while reading it)"
            ) from None
        if not isinstance(state, dict):
            raise UserError(f"{path} is not a kvpareto controller file")
        return cls(state)


class RuleController:
    """Sinks, then recent tokens, then high-attention tokens get the wide width."""

    def score(self, features: torch.Tensor) -> torch.Tensor:
        col = {name: features[:, i] for i, name in enumerate(FEATURES)}
        sink = col["position"] < torch.log1p(torch.tensor(float(SINKS)))
        recent = col["recency"] < torch.log1p(torch.tensor(float(RECENT)))
        return 2.0 * sink + 1.0 * recent + torch.sigmoid(col["attn"])

    def mix(self, target: float) -> dict[int, float]:
        low, high = (2, 8) if target <= 8 else (8, 16)
        wide = (target - low) / (high - low)
        return {low: 1.0 - wide, high: wide}


def build_mlp(n_features: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, len(WIDTHS)),
    )


def water_fill(scores: list[float], target: float) -> dict[int, float]:
    """The width mix with mean `target` when each score (a log2 width need) is raised by one
    common offset: tokens step up one width at a time, neediest first, and the step that would
    overshoot is taken by the fraction that lands exactly on the target."""
    levels = [math.log2(w) for w in WIDTHS]
    n = len(scores)
    # Token i steps from width j to j + 1 when its score plus the offset passes level j.
    steps = range(len(WIDTHS) - 1)
    events = sorted((levels[j] - s, i, j) for j in steps for i, s in enumerate(scores))
    at = [0] * n
    mean, partial = float(WIDTHS[0]), None
    for _, i, j in events:
        step = (WIDTHS[j + 1] - WIDTHS[j]) / n
        if mean + step > target + 1e-9:  # float sums must not miss an exact target
            partial = (j, (target - mean) / step)
            break
        at[i], mean = j + 1, mean + step
    mix = dict.fromkeys(WIDTHS, 0.0)
    for j in at:
        mix[WIDTHS[j]] += 1 / n
    if partial:
        j, part = partial
        mix[WIDTHS[j]] -= part / n
        mix[WIDTHS[j + 1]] += part / n
    return {w: f for w, f in mix.items() if f > 1e-12}


def load_controller(kv_scheme: str, name: str) -> LearnedController | RuleController:
    """The controller a Config names: the rule for kv_scheme rule, else a learned file."""
    if kv_scheme == "rule":
        return RuleController()
    return LearnedController.load(controller_path(name))


def controller_hash(name: str) -> str:
    """The file's sha256: it enters trial-cache keys, so a retrained controller is a new trial."""
    import hashlib

    return hashlib.sha256(controller_path(name).read_bytes()).hexdigest()[:16]


def controller_path(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        path = SHIPPED / f"{name}.pt"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.pt"))) or "none"
        raise UserError(
            f"no controller file or name {name!r} (shipped: {shipped}); train one with "
            "kvpareto controller train --model M --out FILE and pass --controller FILE"
        )
    return path
