"""TotalSegmentator's prediction steps for one ``total`` model, in this process, with an engine.

TotalSegmentator builds its own ``nnUNetPredictor`` inside each call, so an
engine cannot reach its network.  For a single-model task without
``roi_subset`` (``total`` fast and fastest) segnode runs the same steps as
TotalSegmentator's ``nnUNet_predict_image``, with TotalSegmentator's own
functions, and only the predictor built here:

1. a float copy of the input, ``as_closest_canonical``;
2. ``change_spacing`` to the model's resolution (order 1, int32, as the API's
   default ``resampling_order``);
3. nnU-Net's ``predict_single_npy_array`` on that array as nnU-Net's
   SimpleITK reader would read TotalSegmentator's temporary NIfTI
   (``[z, y, x]``, spacing reversed), tile step 0.8 (TotalSegmentator's for
   ``total``), Gaussian weighting, no mirroring;
4. ``remove_auxiliary_labels``, ``change_spacing`` back (order 0, uint8, forced
   affine), ``undo_canonical``.

What it leaves out is TotalSegmentator's file traffic: the temporary
compressed NIfTI files written and read back, and the preprocessing and export
worker processes ``predict_from_files`` spawns.  The parity gate compares its
labels with ``totalsegmentator()``'s own (docs/models.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from nibabel import Nifti1Image

#: TotalSegmentator's tile step for the ``total`` tasks (nnUNet_predict_image)
TOTAL_STEP_SIZE = 0.8
#: TotalSegmentator's default ``resampling_order`` of the input
INPUT_ORDER = 1


class NpyPredictor(Protocol):
    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict[str, Any],
                                 segmentation_previous_stage: np.ndarray | None, output_file_truncated: str | None,
                                 save_or_return_probabilities: bool) -> np.ndarray: ...


def predict_image(image: Nifti1Image, predictor: NpyPredictor, resolution_mm: float, task: str) -> np.ndarray:
    """TotalSegmentator's multilabel array for ``image`` (its own ``[x, y, z]`` grid, uint8)."""
    import nibabel as nib
    from totalsegmentator.alignment import as_closest_canonical, undo_canonical
    from totalsegmentator.postprocessing import remove_auxiliary_labels
    from totalsegmentator.resampling import change_spacing

    spacing = [resolution_mm] * 3
    canonical = as_closest_canonical(nib.Nifti1Image(image.get_fdata(), image.affine))
    resampled = change_spacing(canonical, spacing, order=INPUT_ORDER, dtype=np.int32, nr_cpus=1)
    zooms = resampled.header.get_zooms()
    data = np.asanyarray(resampled.dataobj).astype(np.float32).transpose(2, 1, 0)[None]
    seg = predictor.predict_single_npy_array(np.ascontiguousarray(data), {"spacing": [float(zooms[2]), float(zooms[1]),
                                                                                      float(zooms[0])]},
                                             None, None, False)
    predicted = nib.Nifti1Image(np.asarray(seg).transpose(2, 1, 0).astype(np.uint8), resampled.affine)
    predicted = remove_auxiliary_labels(predicted, task)
    back = change_spacing(predicted, spacing, canonical.shape, order=0, dtype=np.uint8, nr_cpus=1,
                          force_affine=canonical.affine)
    return np.asanyarray(undo_canonical(back, image).dataobj).astype(np.uint8)
