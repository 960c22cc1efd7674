"""Train: clean fine-tunes (and, as later modules land, attacks) through LightningCLI.

    python train.py fit --config configs/experiment/embedded_finetune.yaml --data.task shapes
    python train.py fit --config configs/experiment/vitb32_finetune.yaml --data.task eurosat \
        --data.data_dir /data/eurosat --trainer.devices 4
    python train.py fit --config ... --ckpt_path last        # resume from the last checkpoint

Every run saves its resolved config (config.yaml) in its log directory; the exported encoder lands
where the ExportEncoder callback says (default <log_dir>/encoder.safetensors).
"""

from __future__ import annotations


from lightning.pytorch.cli import LightningCLI

from datamodules.datamodule import TaskDataModule
from lightning_modules.finetune import FineTune  # the base class: BackdoorInjection etc. are chosen by class_path


class BadMergingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # One task name drives both the head (model) and the data.
        parser.link_arguments("data.task", "model.init_args.task")
        parser.link_arguments("model.init_args.model_name", "data.model_name")
        parser.link_arguments("model.init_args.cache_dir", "data.cache_dir")


def main(args=None):
    return BadMergingCLI(
        FineTune,
        TaskDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
