"""Model types of our own for transformers' Auto classes: a family of configs and models that
wrap a base transformers architecture whose layers a method reshaped (pruned, low-rank).

A saved directory holds the base model's own config fields plus:

    "model_type": "slimtune_pruned"          # the family's type: transformers alone refuses it
    "base_model_type": "llama"               # the architecture it was made from
    "base_architecture": "LlamaForCausalLM"
    "slimtune_load_hint": "import pruning ..."
    ... the method's own entry (the kept indices, the ranks)

`Family.register()` (called when the method package is imported) registers the family's type
with `AutoConfig`. Reading such a config builds, once per base architecture, a config class
(a subclass of the base config with the family's `model_type`) and a model class (a subclass of
the base model whose `__init__` gives the layers their smaller shapes, from the config), and
registers that pair with every Auto model class that maps the base config to the base model
(`AutoModelForCausalLM`, `AutoModelForImageClassification`, ...). So
`AutoModelForCausalLM.from_pretrained(dir)` returns the physically smaller model, with the
base class's `generate`, `save_pretrained` and `push_to_hub`; no `trust_remote_code`.

Without the import, transformers raises "model type `slimtune_pruned` ... does not recognize
this architecture"; the config's `slimtune_load_hint` and the directory's README.md name the
package to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from eval.errors import UserInputError

# Auto classes a family's models are registered with (those that map the base config to the base model).
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageClassification", "AutoModelForSequenceClassification",
                 "AutoModel")


@dataclass
class Family:
    """One method's model type.

    model_type: the saved `model_type` (e.g. "slimtune_pruned").
    package: what to import to load it (e.g. "pruning").
    build: (model) -> None, run at the end of the model class's `__init__`: reshape the dense
        base model to the smaller shapes its config describes (weights are filled by loading).
    before_save: (model) -> None, run before `save_pretrained` (e.g. refresh the config entry
        from the modules).
    card: (model, directory) -> None, writes the directory's README.md after `save_pretrained`.
    """

    model_type: str
    package: str
    build: Callable
    before_save: Callable | None = None
    card: Callable | None = None
    _classes: dict = field(default_factory=dict)

    @property
    def hint(self) -> str:
        return (f"import {self.package}  # registers model_type {self.model_type!r} with transformers' Auto classes; "
                "then AutoModelFor*.from_pretrained(dir) (no trust_remote_code)")

    def register(self) -> None:
        """Register the family's model type with `AutoConfig` (idempotent)."""
        from transformers import AutoConfig

        AutoConfig.register(self.model_type, self._stub_config(), exist_ok=True)

    def _stub_config(self):
        if "stub" in self._classes:
            return self._classes["stub"]
        from transformers import PretrainedConfig

        family = self

        class FamilyConfig(PretrainedConfig):
            """What `AutoConfig` finds for the family's type: reading a config dict turns it into
            the family's subclass of the base architecture's config."""

            model_type = self.model_type

            @classmethod
            def from_dict(cls, config_dict, **kwargs):
                config_class, _ = family.classes_for(config_dict)
                return config_class.from_dict(config_dict, **kwargs)

        FamilyConfig.__name__ = FamilyConfig.__qualname__ = f"{_camel(self.model_type)}Config"
        self._classes["stub"] = FamilyConfig
        return FamilyConfig

    def classes_for(self, config_dict: dict):
        """(config class, model class) for a saved config dict of this family."""
        import transformers
        from transformers import CONFIG_MAPPING

        base_type, arch = config_dict.get("base_model_type"), config_dict.get("base_architecture")
        if base_type not in CONFIG_MAPPING or not hasattr(transformers, arch or ""):
            raise UserInputError(
                f"a {self.model_type!r} config needs 'base_model_type' (a transformers model type) and "
                f"'base_architecture' (a transformers model class); got {base_type!r}, {arch!r}"
            )
        return self.classes(CONFIG_MAPPING[base_type], getattr(transformers, arch))

    def classes(self, base_config_class, base_model_class):
        """The family's (config class, model class) over a base pair, built and registered once."""
        key = (base_config_class, base_model_class)
        if key in self._classes:
            return self._classes[key]
        self.register()
        family = self
        name = _camel(self.model_type) + base_model_class.__name__
        config_class = type(f"{_camel(self.model_type)}{base_config_class.__name__}", (base_config_class,),
                            {"model_type": self.model_type, "__module__": __name__})

        def __init__(model, config, *args, **kwargs):
            base_model_class.__init__(model, config, *args, **kwargs)
            family.build(model)

        def save_pretrained(model, save_directory, *args, **kwargs):
            if family.before_save is not None:
                family.before_save(model)
            result = base_model_class.save_pretrained(model, save_directory, *args, **kwargs)
            if family.card is not None and kwargs.get("is_main_process", True):
                family.card(model, save_directory)
            return result

        model_class = type(name, (base_model_class,), {
            "config_class": config_class, "__init__": __init__, "save_pretrained": save_pretrained,
            "__module__": __name__, "__doc__": f"{base_model_class.__name__} reshaped by slimtune ({self.model_type}).",
            # transformers reads the defining module's source to decide this; ours is the base model's answer
            "_can_set_attn_implementation_cached_value": base_model_class._can_set_attn_implementation(),
        })
        globals()[config_class.__name__] = config_class  # importable by name (copy, repr)
        globals()[model_class.__name__] = model_class
        import transformers

        for auto_name in _AUTO_CLASSES:
            auto = getattr(transformers, auto_name)
            mapping = auto._model_mapping
            try:
                mapped = mapping[base_config_class]
            except KeyError:
                continue
            if base_model_class in (mapped if isinstance(mapped, (list, tuple)) else (mapped,)):
                auto.register(config_class, model_class, exist_ok=True)
        self._classes[key] = (config_class, model_class)
        return config_class, model_class

    def adopt(self, model) -> None:
        """Make a live base model (already reshaped) an instance of the family's class, so that
        `model.save_pretrained` writes the family's type. Its config object is converted in place
        (every submodule that holds it sees the change)."""
        config = model.config
        if getattr(type(config), "model_type", None) == self.model_type:
            return
        base_config_class, base_model_class = type(config), type(model)
        config_class, model_class = self.classes(base_config_class, base_model_class)
        config.base_model_type = base_config_class.model_type
        config.base_architecture = base_model_class.__name__
        config.slimtune_load_hint = self.hint
        config.__class__ = config_class
        model.__class__ = model_class

    def config_from_base_dict(self, base_dict: dict, architecture: str, **extra):
        """A family config from a plain base config dict (directories saved before the family existed)."""
        data = {**base_dict, **extra, "model_type": self.model_type, "base_model_type": base_dict.get("model_type"),
                "base_architecture": architecture, "slimtune_load_hint": self.hint}
        config_class, _ = self.classes_for(data)
        return config_class.from_dict(data)


def _camel(model_type: str) -> str:
    return "".join(part.capitalize() for part in model_type.replace("-", "_").split("_"))
