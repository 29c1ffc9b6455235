"""A model trained on the phantom alone must find the liver in real CT it has never seen.

The model is the README's single-model quickstart (experiments/quickstart.yaml) trained on the current
phantom, stored by ``python -m tests.data.make_phantom_model``; it is refused here when the phantom or the
recipe changed since, so the check below always speaks of the phantom as it is. It is run through
``lits predict`` on the real CT sample (tests/data/real-ct-sample) and on variants made from it the way
LiTS volumes differ (tests/real_ct_variants.py): 512 x 512 at 0.98 mm stored LAS or LPS, and a 20-slice
2 mm slab of the upper abdomen. A phantom whose spleen or field of view misleads the model (an earlier
one did: a model trained on it segmented the spleen of a real 2 mm slab) fails here.
"""

import nibabel as nib
import numpy as np
import pytest
import torch

from experiments.commands.predict import predict_main
from tests.data.make_phantom_model import MODEL, recipe_fingerprint
from tests.real_ct_variants import VARIANTS, write_variant

MIN_DICE = 0.8


def test_the_stored_model_was_trained_on_the_current_phantom_and_recipe():
    stored = torch.load(MODEL, map_location="cpu", weights_only=True)["phantom_model"]
    assert stored == recipe_fingerprint(), (
        f"{MODEL.name} was trained on {stored}, not the current {recipe_fingerprint()}: "
        "retrain it with `python -m tests.data.make_phantom_model`")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_phantom_model_finds_the_liver_in_real_ct(variant, tmp_path):
    data = write_variant(variant, tmp_path / "data")
    predict_main([str(MODEL), "--input", str(data), "--output", str(tmp_path / "out"), "--device", "cpu"])
    (prediction,) = (tmp_path / "out").glob("*.nii*")
    truth_image = nib.load(data / "segmentation-0.nii.gz")
    predicted_image = nib.load(prediction)
    assert np.allclose(predicted_image.affine, truth_image.affine)  # written on the input's own grid
    predicted = np.asarray(predicted_image.dataobj) > 0
    truth = np.asarray(truth_image.dataobj) > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice >= MIN_DICE, f"{variant}: liver Dice {dice:.3f} < {MIN_DICE}"
