"""``lits predict RUN1 RUN2 ...`` (an ensemble) and ``--tta`` (test-time mirroring): the probabilities written are the
mean over the models, incompatible models are refused, and a resumed run never mixes its outputs with another
setting's."""

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.errors import CheckpointError, ConfigError, DataError
from experiments.commands.predict import CascadePredictor, predict_main
from lightning_modules import BaselineUNet, CombinedLiverLesion
from lightning_modules.inference.liver_guided import LiverGuided
from tests.experiments.commands.test_predict import HU, lits_folder, save_task, snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_task(BaselineUNet(base_channels=4), folder / f"liver{seed}.ckpt"))
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return lits_folder(tmp_path_factory.mktemp("data"), volumes=1)


def probability(folder) -> np.ndarray:
    return np.asarray(nib.load(folder / "segmentation-0_liver_probability.nii.gz").dataobj)


def predict(*argv):
    predict_main([str(a) for a in argv])


def test_an_ensemble_writes_the_mean_of_the_models_probabilities(models, data, tmp_path):
    for name, chosen in (("a", models[:1]), ("b", models[1:]), ("ab", models)):
        predict(*chosen, "--input", data, "--output", tmp_path / name, "--probabilities")
    mean = (probability(tmp_path / "a") + probability(tmp_path / "b")) / 2
    assert np.allclose(probability(tmp_path / "ab"), mean, atol=1e-6) and not np.allclose(mean, probability(tmp_path / "a"), atol=1e-3)
    labels = np.asarray(nib.load(tmp_path / "ab" / "segmentation-0.nii").dataobj)
    assert set(np.unique(labels)) <= {0, 1}


def test_an_ensemble_of_one_model_is_the_model(models):
    single, ensemble = CascadePredictor(models[0], device="cpu"), CascadePredictor([models[0]], device="cpu")
    assert ensemble.liver_predict is ensemble.liver.predictor
    assert np.array_equal(single(HU, probabilities=True)["liver_probability"], ensemble(HU, probabilities=True)["liver_probability"])


def test_tta_mirrors_2d_networks_in_plane_and_3d_networks_along_slices_too(models, tmp_path):
    assert len(CascadePredictor(models, device="cpu", tta=True).liver_predict.flips) == 4
    torch.manual_seed(0)
    volume = save_task(BaselineUNet(base_channels=4, spatial_dims=3), tmp_path / "liver3d.ckpt")
    assert len(CascadePredictor(volume, device="cpu", tta=True).liver_predict.flips) == 8


def test_a_combined_model_ensemble_with_tta_averages_both_networks(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_task(CombinedLiverLesion(base_channels=4), tmp_path / f"combined{seed}.ckpt", target="both"))
    predictor = CascadePredictor(paths, device="cpu", tta=True)
    liver, _, lesion, _ = predictor.cascade({"image": torch.zeros(4, 32, 32), "full_shape": torch.tensor(HU.shape)})
    assert len(liver.predictors) == len(lesion.predict.predictors) == 2 and len(liver.flips) == 4
    assert isinstance(lesion, LiverGuided)  # the cascade still feeds the lesion networks the liver probability
    result = predictor(HU)
    assert result["labels"].shape == HU.shape


@pytest.mark.parametrize("change", [{"image_size": 64}, {"hu_window": [-100.0, 200.0]}])
def test_models_of_other_preprocessing_are_refused_naming_both(models, tmp_path, change):
    torch.manual_seed(2)
    other = save_task(BaselineUNet(base_channels=4), tmp_path / "other.ckpt")
    checkpoint = torch.load(other, weights_only=False)
    checkpoint["datamodule_hyper_parameters"] |= change
    torch.save(checkpoint, other)
    with pytest.raises(CheckpointError, match=f"{models[0]} and {other} cannot be ensembled: liver {next(iter(change))}") as caught:
        CascadePredictor([models[0], other], device="cpu")
    assert "\n" not in str(caught.value)


def test_a_liver_network_and_a_combined_model_are_refused(models, tmp_path):
    torch.manual_seed(0)
    combined = save_task(CombinedLiverLesion(base_channels=4), tmp_path / "combined.ckpt", target="both")
    with pytest.raises(CheckpointError, match="cannot be ensembled: kind 'liver network' vs 'combined model'"):
        CascadePredictor([models[0], combined], device="cpu")


def test_a_model_named_twice_is_refused(models, data, tmp_path):
    with pytest.raises(ConfigError, match="is given twice"):
        predict(models[0], models[0], "--input", data, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_never_mixes_models_or_mirroring(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    predict(*models, "--input", data, "--output", out)
    mark = nib.load(out / "segmentation-0.nii").header["descrip"].item().decode()
    assert mark.startswith("lits-suite: lits predict 2 models #")
    before = snapshot(out)
    for other in ([models[0]], [*models, "--tta"], [models[1]]):
        with pytest.raises(DataError, match="segmentation-0.nii exists .*predicted with other models or mirroring") as caught:
            predict(*other, "--input", data, "--output", out)
        assert "\n" not in str(caught.value)
    assert snapshot(out) == before
    capsys.readouterr()
    predict(*models[::-1], "--input", data, "--output", out)  # the same ensemble in another order: done already
    assert "nothing to predict" in capsys.readouterr().out
    predict(models[0], "--tta", "--input", data, "--output", out, "--overwrite")
    assert nib.load(out / "segmentation-0.nii").header["descrip"].item().decode().startswith("lits-suite: lits predict 1 model tta #")
