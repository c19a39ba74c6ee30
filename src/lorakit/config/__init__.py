"""The configuration layer: what a run is (`RunConfig`), recipes (YAML files and flag overrides), every choice list,
and where things are (recipes, data files, run directories: `paths`).

Imports only `lorakit.errors`. Everything above it (the engine, data, models, training, ...) reads its choices
and settings from here; nothing here imports them.
"""
from .choices import (COMBINE_METHODS, DTYPES, EXPORT_FORMATS, EXPORT_QUANTS, INITS, METHODS, OPTIMIZERS, PRECISIONS,
                      INFER_DTYPES, PREFERENCE_LOSSES, REFERENCE_FREE,
                      QUANT_BACKENDS, QUANTIZE, REPORT_TO, SCHEDULES, STRATEGIES, TARGET_PRESETS, TASKS, TEMPLATES,
                      TRAIN_ON)
from .paths import RECIPES, builtin_recipes, data_file, embedded_data, recipe_file, run_dir
from .recipes import apply_overrides, did_you_mean, load_recipe, make_config
from .run_config import FIELDS, ConfigError, RunConfig, coerce, validate

__all__ = ["COMBINE_METHODS", "DTYPES", "INFER_DTYPES", "EXPORT_FORMATS", "EXPORT_QUANTS", "INITS", "METHODS", "OPTIMIZERS", "PRECISIONS",
           "PREFERENCE_LOSSES", "REFERENCE_FREE",
           "QUANT_BACKENDS", "QUANTIZE", "REPORT_TO", "SCHEDULES", "STRATEGIES", "TARGET_PRESETS", "TASKS", "TEMPLATES", "TRAIN_ON",
           "RECIPES", "builtin_recipes", "data_file", "embedded_data", "recipe_file", "run_dir", "apply_overrides", "did_you_mean",
           "load_recipe", "make_config", "FIELDS", "ConfigError", "RunConfig", "coerce", "validate"]
