"""Step 6: export the final global adapter as a PEFT directory."""

from kfp.dsl import Input, Model, Output


def export_adapter(config: dict, global_adapter: Input[Model], adapter: Output[Model]):
    """Write ``adapter`` so that ``PeftModel.from_pretrained(base_model, adapter.path)`` loads it."""
    from fedfm import events
    from fedfm.federation import export, step_config

    with events.step("export"):
        cfg = step_config(config)
        provenance = export(cfg, global_adapter.path, adapter.path)
    adapter.metadata.update(provenance)
    adapter.metadata["framework"] = "peft"
