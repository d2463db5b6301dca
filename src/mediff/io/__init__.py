"""Reading and writing medical images: NIfTI, DICOM (file or series folder), PNG/TIFF, NPY/NPZ, fastMRI HDF5.

The package's public API; each format lives in its own module (``mediff.io.nifti``, ``dicom_read``,
``dicom_write``, ``raster``, ``arrays``, ``hdf5``), the format dispatch in ``mediff.io.formats``.

Conventions (every reader follows them, every writer expects them):

* ``MedicalImage.affine`` is a 4x4 float64 matrix mapping a voxel index ``(i, j, k, 1)`` to world
  millimetres in RAS+ as nibabel uses it: +x towards the patient's Right, +y Anterior, +z Superior
  (DICOM's LPS+ with x and y negated). A 2D array ``(H, W)`` uses the same matrix with ``k = 0``;
  its third column is the slice-normal step (slice thickness).
* Axis order is the order of the affine's voxel index, and depends on where the data came from
  (``meta["axes"]`` says it in words):
    - NIfTI: exactly as stored (no reorientation), ``(i, j, k[, t])``.
    - DICOM: ``(row, col)`` for one slice, ``(row, col, slice)`` for a series or multi-frame file,
      i.e. an axial slice displays upright with ``array[:, :, k]``. Series slices are ordered by
      ascending position along the slice normal ``row_cosine x col_cosine``.
    - PNG/TIFF: ``(row, col)`` (multi-page TIFF: ``(row, col, page)``); geometry unknown.
    - NPY/NPZ: as stored; geometry from NPZ keys ``affine``/``spacing`` when present.
    - fastMRI HDF5: ``(slice, row, col)`` as fastMRI stores it, so images line up with k-space.
* ``spacing`` is the voxel size in mm for each spatial axis (length = number of spatial axes).
  ``meta["spacing_known"]`` is False when the format carries no geometry (then spacing is 1 mm).
* Values: stored values are converted to physical units (DICOM RescaleSlope/Intercept, so CT is in
  HU; NIfTI scl_slope/scl_inter). The array keeps its stored dtype when that conversion is the
  identity and becomes float32 otherwise. ``raw=True`` skips the conversion.
* ``meta`` never contains patient-identifying DICOM tags (names, IDs, birth dates).

Every problem caused by the input (missing/corrupt/unsupported file, bad options) raises
:class:`mediff.errors.MediffError` with a one-line message naming the file.
"""

from mediff.io.arrays import NPZ_IMAGE_KEYS, NPZ_META_KEYS, write_npz
from mediff.io.atomic import atomic_write
from mediff.io.dicom_read import dicom_modality, first_dicom, holds_dicom
from mediff.io.dicom_write import write_dicom
from mediff.io.formats import describe, detect_format, read_image, write_image
from mediff.io.hdf5 import read_kspace_h5
from mediff.io.image import MedicalImage, PathLike
from mediff.io.nifti import write_nifti
from mediff.io.raster import write_png
from mediff.io.volume import slices_to_volume, volume_to_slices

__all__ = [
    "MedicalImage",
    "read_image",
    "read_kspace_h5",
    "write_image",
    "write_nifti",
    "write_png",
    "write_npz",
    "write_dicom",
    "volume_to_slices",
    "slices_to_volume",
    "describe",
    "detect_format",
    "dicom_modality",
    "first_dicom",
    "holds_dicom",
    # The package's one atomic writer (checkpoints and reports use it too), read_image's NPZ key rule:
    "atomic_write",
    "NPZ_IMAGE_KEYS",
    "NPZ_META_KEYS",
    "PathLike",
]
