"""Every choice a recipe key or a flag takes, defined once: the config's validators, the engine's checks and the
CLI's `choices=` all read these."""
from __future__ import annotations

TASKS = ("classify", "instruct", "summarize", "chat", "preference")
CHAT_TASKS = ("chat", "preference")  # their data are conversations: rendered in a chat template, never Alpaca's
TEMPLATES = ("alpaca", "chat", "chatml")  # chat: the tokenizer's own chat template (ChatML where it has none)
TRAIN_ON = ("all", "last")  # chat: which assistant turns the loss covers
METHODS = ("full", "lora", "qlora")
SCHEDULES = ("cosine", "linear", "constant")
QUANTIZE = ("nf4",)
QUANT_BACKENDS = ("auto", "torch", "bitsandbytes")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "no", "bf16", "fp16")  # mixed_precision: accelerate's autocast over fp32 weights
DTYPES = ("auto", "fp32", "bf16")  # precision: what the frozen base is stored and computed in (engine.precision)
INFER_DTYPES = ("auto", "fp32", "bf16", "int8")  # infer_dtype / --dtype: generation, evaluation, serving
COMBINE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # engine.combine
TARGET_PRESETS = ("all-linear", "attention", "mlp")  # resolved per architecture by engine.targets
EXPORT_FORMATS = ("gguf", "gguf-lora", "ollama")  # lorakit export
EXPORT_QUANTS = ("f32", "f16", "q8_0", "q4_0")
INITS = ("kaiming", "gaussian", "pissa", "olora")  # LoRA's starting A and B (engine.init)
REPORT_TO = ("none", "tensorboard", "mlflow", "trackio")  # training.trackers
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")  # TRL's names (training.preference)
REFERENCE_FREE = ("orpo", "simpo")  # the losses that need no reference model


def default_template(task: str) -> str:
    """The prompt format a run of `task` uses when its recipe names none: the model's chat template for
    conversations, the Alpaca prompt otherwise."""
    return "chat" if task in CHAT_TASKS else "alpaca"


def one_of(choices: tuple[str, ...]) -> str:
    """'a, b or c': the choices as a message lists them."""
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
