"""MaskMining: a trained segmentation model of the suite, retrained on its own errors (Roth et al., sections 2 and 4).

The base checkpoint (BaselineUNet, PretrainedUNet, CMUNet, or an earlier MaskMining round) is
rebuilt with every learned weight, and the backbone's four 1x1-conv error channels (TN, FP, FN, TP)
are appended beside its segmentation head. The new channels start as the base's own decision: TP
carries the segmentation head's weights, TN their negation, FP and FN zero. So before retraining
the decoded error head gives exactly the base model's mask, and retraining starts from it.

Mining is done on the fly: a frozen copy of the base model predicts every training batch after
augmentation, so each error mask (``2 * truth + prediction``, see ``error_masks``) belongs to
exactly the input the retrained model sees. These are forward passes only, over training batches.
With ``miner_checkpoints`` (cross-mining) each training slice is mined by the model of its fold,
which never trained on it (``data.num_folds``, ``data.holdout_fold``).

Validation and test report the retrained model's final mask (``argmax // 2`` for ``pwce``, the TP
channel for ``dice``) under the suite's usual names, the base model's figures under
``{stage}/before/...``, and FP / FN / TP voxel counts of both (the error-type report, ``error_report``).

A cascade mines both of its networks (the paper's Inc. rows change the liver figures too): first the liver
network (a ``MaskMining`` run on ``target: liver``), then the lesion network with the mined liver network as
``liver_checkpoint`` (the lesion network sees the mined liver's regions) and the trained liver network as
``base_liver_checkpoint``, so that ``{stage}/before/...`` is the cascade as trained, both networks unmined.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from datamodules import DataError
from datamodules.errors import CheckpointError
from lightning_modules.inference.cascade_evaluation import (
    FIGURE_KEYS, PARTS, LiverNetwork, case_figures, part_error_counts, summarize_cascade_volumes,
)
from lightning_modules.inference.evaluation_3d import record_volume_3d, window_volume
from lightning_modules.losses.error_masks import LOSSES, TN, TP, build_error_loss, error_head_probability, error_mask
from lightning_modules.losses.focal import focal_loss, slice_labels
from lightning_modules.metrics.slice_records import SliceRecords
from lightning_modules.metrics.volume_records import VolumeRecords
from lightning_modules.networks.checkpoints import check_backbone_variant, frozen_model, read_base_checkpoint, rebuilt_model_probability
from lightning_modules.networks.unet import UNet, backbone_variant
from lightning_modules.reports.error_report import write_error_report, write_parts_report
from lightning_modules.segmentation import STAGES, SegmentationTask


def load_with_error_head(model: UNet, weights: dict[str, torch.Tensor]) -> None:
    """Load a base's weights into ``model``, the same U-Net with the four error channels (TN, FP, FN, TP).

    Error channels the base lacks start as its own decision: TP carries the segmentation head's weights, TN
    their negation, FP and FN zero, so the decoded error head gives exactly the base's mask. A base that has
    them (an earlier mining round) keeps its own.
    """
    missing, _ = model.load_state_dict(weights, strict=False)
    if missing:
        assert sorted(missing) == ["error_head.bias", "error_head.weight"], missing
        with torch.no_grad():
            head, errors = model.segmentation_head, model.error_head
            errors.weight.zero_()
            errors.bias.zero_()
            errors.weight[TP], errors.bias[TP] = head.weight[0], head.bias[0]
            errors.weight[TN], errors.bias[TN] = -head.weight[0], -head.bias[0]


class MaskMining(SegmentationTask):
    """Retrain a base segmentation model on its TN / FP / FN / TP error masks.

    The backbone's arguments come from the base: in_channels, out_channels, spatial_dims, block and se
    must match it (checked; out_channels must be 1), base_channels and norm are not used and the saved
    hyperparameters record the base's. The error head trains with ``loss``, so ``seg_loss`` is not used;
    ``distance_weights``, ``distance_w0`` and ``distance_sigma`` weight ``pwce``. The optimisation defaults are the
    mask-mining paper's (Adam with L2 1e-5, a step schedule). Other arguments: ``SegmentationTask``'s
    and ``BaseTask``'s.

    Args:
        base_checkpoint: the trained model to boost (its architecture comes from the checkpoint).
        base_liver_checkpoint: a cascade's lesion network whose liver network was mined too: the trained (unmined)
            liver network, which the cascade before mining (``{stage}/before/...``) runs, while the cascade after
            mining runs ``liver_checkpoint``, the mined one. ``None``: both run ``liver_checkpoint``.
        loss: ``dice`` (multiclass Dice, TP channel replaced by the ground truth; the mask is the TP
            channel: the paper's choice, towards recall) or ``pwce`` (pixel-weighted cross-entropy;
            the mask is ``argmax // 2``: towards fewer false positives).
        miner_checkpoints: cross-mining: one model per fold of ``data.num_folds``, model ``j``
            trained without fold ``j`` (``data.holdout_fold=j``); ``None`` mines with the base.
        class_weights: ``pwce`` weights of TN, FP, FN, TP (``None``: all 1).
        cls_weight: weight of the slice-classification focal loss, kept on when the base has a
            classification head (CMU-Net); 0 switches it off. Loss = error loss + cls_weight * focal.
        focal_alpha: that focal loss's weight of positive slices (CMU-Net's 0.8).
        focal_gamma: that focal loss's focusing exponent (CMU-Net's 2).
        lr: Adam learning rate (1e-4 by default; the paper gives none for the retraining, and the experiment YAMLs
            say where theirs comes from).
        weight_decay: Adam L2 penalty (the paper's 1e-5).
        scheduler: ``step`` here (see ``BaseTask``).
        step_size: StepLR period in epochs (10 here).
        step_gamma: StepLR factor (0.5 here: halved every step_size epochs).
    """

    def __init__(
        self,
        base_checkpoint: str = "",
        base_liver_checkpoint: str | None = None,
        loss: str = "dice",
        miner_checkpoints: list[str] | None = None,
        class_weights: list[float] | None = None,
        cls_weight: float = 0.0,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        **kwargs,
    ) -> None:
        if loss not in LOSSES:
            raise CheckpointError(f"unknown mask-mining loss {loss!r}; choose one of: {', '.join(LOSSES)} (--model.init_args.loss)")
        # The paper's optimisation replaces BaseTask's defaults. kwargs.pop(name, literal default) is the one
        # form in which LightningCLI (jsonargparse) reads a changed default through **kwargs; it types these
        # five from their defaults (a value of another type is not refused, unlike a signature's annotation).
        super().__init__(lr=kwargs.pop("lr", 1e-4), weight_decay=kwargs.pop("weight_decay", 1e-5),
                         scheduler=kwargs.pop("scheduler", "step"), step_size=kwargs.pop("step_size", 10),
                         step_gamma=kwargs.pop("step_gamma", 0.5), **kwargs)

    # -- hooks -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        path = h.base_checkpoint
        self.base_architecture, weights = read_base_checkpoint(path)
        arch = self.base_architecture
        # saved with the weights, so that a later round rebuilds this model from its checkpoint
        self.hparams.update(base_channels=arch.base_channels, norm=arch.norm)
        if arch.out_channels != 1 or h.out_channels != 1:
            raise CheckpointError(f"{path} has out_channels={arch.out_channels}; mask mining retrains one target channel (liver or lesion): out_channels must be 1")
        if arch.in_channels != h.in_channels:
            raise CheckpointError(f"{path} was trained with in_channels={arch.in_channels} but this run has in_channels={h.in_channels}; use the base's --data.context_slices")
        check_backbone_variant(path, arch.variant, backbone_variant(h))
        if h.cls_weight > 0 and not arch.has_classification_head:
            raise CheckpointError(f"cls_weight={h.cls_weight} keeps a classification loss, but {path} has no classification head (a CMU-Net base has one); set cls_weight to 0")
        self.model = UNet(arch.in_channels, 1, arch.base_channels, arch.norm,
                          num_classes=1 if arch.has_classification_head else None, num_error_classes=4, **arch.variant)
        load_with_error_head(self.model, weights)
        if h.get("base_liver_checkpoint") and not h.get("liver_checkpoint"):
            raise CheckpointError("base_liver_checkpoint is the unmined liver network of a cascade whose mined liver network is "
                                  "--model.init_args.liver_checkpoint; set that too, or drop base_liver_checkpoint")
        self._base_liver = [LiverNetwork(h.base_liver_checkpoint)] if h.get("base_liver_checkpoint") else []  # frozen, as _base
        # Frozen miners live outside the module tree: not trained, not in checkpoints, not in DDP.
        self._base = [frozen_model(arch, weights)]
        self._miners: list[UNet] = []
        for miner_path in h.miner_checkpoints or []:
            miner_arch, miner_weights = read_base_checkpoint(miner_path)
            miner_network = (miner_arch.in_channels, miner_arch.base_channels, miner_arch.norm, miner_arch.variant)
            if miner_network != (arch.in_channels, arch.base_channels, arch.norm, arch.variant):
                raise CheckpointError(f"fold model {miner_path} has another architecture than the base {path}; train the fold models with the base's config")
            self._miners.append(frozen_model(miner_arch, miner_weights))

    def configure_losses(self) -> None:
        h = self.hparams
        options = dict(class_weights=h.class_weights, distance_weights=h.distance_weights, w0=h.distance_w0, sigma=h.distance_sigma)
        self.error_loss = build_error_loss(h.loss, **(options if h.loss == "pwce" else {}))
        self.focal_loss = focal_loss(h.focal_alpha, h.focal_gamma) if h.cls_weight > 0 else None

    def configure_metrics(self) -> None:
        super().configure_metrics()
        self.before_records = nn.ModuleDict({stage: SliceRecords() for stage in STAGES})
        self.before_volume_records = nn.ModuleDict({stage: VolumeRecords(FIGURE_KEYS) for stage in STAGES})
        # The frozen base's figures on a stage's data never change: summarised once, then reused.
        self._before: dict[str, tuple[dict[str, float], dict[int, dict[str, float]]]] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if datamodule is None:  # plain dataloaders (e.g. the benchmarks): nothing to check
            return
        arch, data = self.base_architecture, datamodule.hparams
        for liver in self._base_liver:
            liver.check_data(data)
        if arch.target is not None and arch.target != data.target:
            raise DataError(f"{self.hparams.base_checkpoint} was trained on target {arch.target!r} but this run has --data.target={data.target}; mine it on its own target")
        if stage == "fit":
            if not datamodule.splits.get("train"):
                raise DataError(f"nothing to mine: the training split of {datamodule.data_root} is empty; give it volumes with --data.split")
            if self._miners and (data.num_folds != len(self._miners) or data.holdout_fold is not None):
                raise DataError(f"cross-mining with {len(self._miners)} fold models needs --data.num_folds={len(self._miners)} and no --data.holdout_fold")

    # -- mining ----------------------------------------------------------------------------------
    def miner_for(self, volume_index: int) -> int:
        """Index of the fold model that mines this training volume (it never trained on it)."""
        return self.trainer.datamodule.train_folds[int(volume_index)]

    @torch.no_grad()
    def mine(self, batch: dict, training: bool) -> dict:
        """Adds ``errors`` (B, H, W) and, for evaluation, the base's ``base_probs`` (B, 1, H, W) to the batch."""
        image = batch["image"]
        base = self._base[0].to(image.device)
        if training and self._miners:
            probs = torch.empty_like(batch["mask"], dtype=torch.float32)
            folds = torch.tensor([self.miner_for(v) for v in batch["volume_index"].tolist()], device=image.device)
            for fold in folds.unique().tolist():
                chosen = folds == fold
                probs[chosen] = rebuilt_model_probability(self._miners[fold].to(image.device), self.base_architecture, image[chosen]).float()
        else:
            probs = rebuilt_model_probability(base, self.base_architecture, image).float()
        batch["errors"] = error_mask(probs >= self.hparams.threshold, batch["mask"] > 0.5)
        if not training:
            batch["base_probs"] = probs
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        training = self.trainer.training
        # after augmentation and transfer: the exact input; a whole 3D volume is evaluated window by window instead
        if isinstance(batch, dict) and "mask" in batch and (training or batch["image"].ndim != 5):
            batch = self.mine(batch, training=training)
        return batch

    # -- losses and metrics ----------------------------------------------------------------------
    def foreground_probability(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return error_head_probability(outputs["errors"], self.hparams.loss)

    def compute_losses(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        error = self.error_loss(outputs["errors"], batch["errors"], batch["mask"])
        terms = {"loss": error, self.hparams.loss: error}
        if self.focal_loss is not None:
            terms["focal"] = self.focal_loss(outputs["cls"], slice_labels(batch, outputs["cls"]))
            terms["loss"] = error + self.hparams.cls_weight * terms["focal"]
        return terms

    def update_metrics(self, stage: str, outputs: dict[str, torch.Tensor], batch: dict) -> None:
        super().update_metrics(stage, outputs, batch)
        if stage not in self._before:
            self.before_records[stage].update(batch["base_probs"], batch["mask"] > 0.5, batch["volume_index"], batch["slice_index"], self.hparams.threshold)

    def _evaluation_step(self, batch: dict, stage: str) -> None:
        super()._evaluation_step(batch, stage)
        if stage in self._before:
            return
        if self.is_cascade_sample(batch):  # a cascade's lesion network: the base in its place
            index = self.sample_volume_index(batch)
            result = self.predict_base_cascade(batch)
            volume = self.trainer.datamodule.volumes[index]
            self.before_volume_records[stage].update(index, case_figures(result["labels"], volume.label_full(), volume.spacing))
        elif batch["image"].ndim == 5:  # a whole 3D volume: the base's sliding window
            base, arch = self._base[0].to(batch["image"].device), self.base_architecture
            probs = window_volume(self, lambda window: rebuilt_model_probability(base, arch, window), batch["image"])
            record_volume_3d(self, self.before_records[stage], probs, batch)

    def predict_base_cascade(self, sample: dict) -> dict:
        """The cascade on one volume sample with the frozen base in this network's place, and the unmined liver network
        in the mined one's (the figures before mining)."""
        base, arch = self._base[0].to(sample["image"].device), self.base_architecture
        liver = self._base_liver[0] if self._base_liver else None
        return self.predict_cascade(sample, lesion=lambda image: rebuilt_model_probability(base, arch, image), liver=liver)

    def _summarize_before(self, stage: str) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        per_volume = self.before_volume_records[stage].compute() if self.before_volume_records[stage].update_count else {}
        self.before_volume_records[stage].reset()
        if per_volume:  # a cascade: whole volumes, no slice records
            self.before_records[stage].reset()
            return summarize_cascade_volumes(per_volume), per_volume
        records = self.before_records[stage].compute()
        self.before_records[stage].reset()
        return self.summarize_records(records)

    def compute_metrics(self, stage: str) -> dict[str, float]:
        figures = super().compute_metrics(stage)
        if stage not in self._before:
            if not figures:
                self.before_records[stage].reset()
                self.before_volume_records[stage].reset()
                return figures
            summary = self._summarize_before(stage)
            if self.trainer.sanity_checking:  # the sanity check sees a few batches only: not for keeps
                return figures
            self._before[stage] = summary
        if not figures:
            return figures
        before, per_volume_before = self._before[stage]
        after = self.per_volume[stage]
        figures |= {f"{stage}/before/{k}": v for k, v in before.items()}
        if self.evaluates_cascade and "liver/dice" in before:  # one report for the liver, one for lesions, one for both
            parts = {part: (part_error_counts(per_volume_before, part), part_error_counts(after, part)) for part in PARTS}
            for part, (part_before, part_after) in parts.items():
                self._write_error_report(f"{stage}_{part}", part_before, part_after)
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective call: every rank makes it
            if self.trainer.is_global_zero:
                write_parts_report(folder, stage, parts, self.loggers, self.global_step)
        else:
            self._write_error_report(stage, per_volume_before, after)
        return figures

    def _write_error_report(self, stage: str, before: dict, after: dict) -> None:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective call: every rank makes it
        if not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        ids = [v.volume_id for v in self.trainer.datamodule.volumes]
        write_error_report(folder, stage, before, after, ids, self.loggers, self.global_step)
