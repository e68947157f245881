"""Deterministic synthetic chest CT (HU, RAS affine) with multi-label abnormalities and exact masks.

Used to train and test the demo classifier and to score explanations against known lesion voxels:

    from medcam3d.synthetic import make_chest_ct, write_case_nifti, make_dataset
    case = make_chest_ct(seed=7, present={"nodule": True})
    case.volume, case.masks["nodule"], case.labels, case.affine
"""

from medcam3d.synthetic.dataset import SyntheticChestDataset, case_seed, make_dataset
from medcam3d.synthetic.grid import DEFAULT_FOV_MM, DEFAULT_SHAPE
from medcam3d.synthetic.nifti import write_case_nifti
from medcam3d.synthetic.phantom import CLASS_NAMES, SyntheticCase, make_chest_ct

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_FOV_MM",
    "DEFAULT_SHAPE",
    "SyntheticCase",
    "SyntheticChestDataset",
    "case_seed",
    "make_chest_ct",
    "make_dataset",
    "write_case_nifti",
]
