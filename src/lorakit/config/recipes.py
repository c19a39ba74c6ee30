"""Recipes: a YAML file of run settings (sections model / data / lora / preference / train / eval are only grouping), read and
checked key by key, then overridden by the command line's flags."""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from .run_config import FIELDS, SECTIONS, ConfigError, RunConfig, coerce, validate

# What PEFT, Axolotl and LLaMA-Factory call some of lorakit's keys
OTHER_NAMES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
               "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "micro_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "sequence_len": "max_length", "cutoff_len": "max_length"}


def did_you_mean(key: str) -> str:
    """'; did you mean ...?' with lorakit's name for another tool's key or the closest keys; '' if none is close."""
    close = [OTHER_NAMES[key]] if key in OTHER_NAMES else difflib.get_close_matches(key, list(FIELDS) + list(SECTIONS), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def unknown_key(key: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key)}")


def load_recipe(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML recipe, apply `overrides` (CLI values, None = not given) and check every key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such recipe (see `lorakit recipes`)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe is a mapping of keys to values")
    flat: dict = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if k not in FIELDS:
                    raise unknown_key(k, f"{p}, section {key}")
                flat[k] = v
        elif key in FIELDS:
            flat[key] = value
        else:
            raise unknown_key(key, str(p))
    cfg = make_config(flat, str(p))
    if "template" not in flat:
        cfg.template = ""  # the task's default, decided once the flags have had their say (--task chat)
    cfg.recipe_path = str(p)
    if not cfg.name:
        cfg.name = p.stem
    return apply_overrides(cfg, overrides or {})


def make_config(values: dict, where: str = "config") -> RunConfig:
    cfg = RunConfig()
    for k, v in values.items():
        if k not in FIELDS:
            raise unknown_key(k, where)
        setattr(cfg, k, coerce(k, v, where))
    return validate(cfg, where)


def apply_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in FIELDS:
            raise unknown_key(k, "command line")
        setattr(cfg, k, coerce(k, v, "command line"))
        if k == "max_steps" and cfg.max_steps == 0:  # in a recipe 0 is the default, "no limit"; given, a mistake
            raise ConfigError("command line: max_steps must be >= 1, got 0 (leave --max-steps out for no limit)")
        if k == "loraplus_lr_ratio" and cfg.loraplus_lr_ratio == 0:  # the same: 0 is "off", given it is a mistake
            raise ConfigError("command line: loraplus_lr_ratio must be > 0 (B matrices train at lr x ratio; LoRA+ "
                              "suggests 16), got 0; leave it out for plain LoRA")
    return validate(cfg, "command line")


