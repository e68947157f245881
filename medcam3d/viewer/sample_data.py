"""npe2 sample data: a small deterministic synthetic chest CT with its abnormality masks."""

from __future__ import annotations

import numpy as np

from medcam3d.viewer.layers import LayerData, ct_layer_data, mask_layer_data
from medcam3d.viewer.present import present_when_added

SAMPLE_SEED = 7


def synthetic_chest_ct() -> list[LayerData]:
    """The CT (HU, 64x64x48 voxels of 5x5x6 mm, RAS) and one labels layer per abnormality present."""
    import torch
    from monai.data import MetaTensor

    from medcam3d.synthetic import CLASS_NAMES, make_chest_ct

    case = make_chest_ct(SAMPLE_SEED, present={name: True for name in CLASS_NAMES})
    volume = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(case.volume))[None],
        affine=torch.as_tensor(case.affine, dtype=torch.float64),
        meta={"space": "RAS"},
    )
    out = [ct_layer_data(volume, name="synthetic chest CT")]
    out += [mask_layer_data(case.masks[c], c, volume) for c in CLASS_NAMES if case.labels[c]]
    present_when_added(len(out))
    return out


def demo_chest_ct() -> list[LayerData]:
    """The bundled demo scan (medcam3d.data, the scan ``medcam3d demo`` explains) and its
    planted-lesion masks as labels layers, loaded from the shipped NIfTI files."""
    from medcam3d.data import demo_scan_paths
    from medcam3d.io import load_volume
    from medcam3d.synthetic import CLASS_NAMES

    paths = demo_scan_paths()
    volume = load_volume(paths["ct"])
    out = [ct_layer_data(volume, name="demo chest CT")]
    for name in CLASS_NAMES:
        mask = load_volume(paths[name]).numpy()[0] > 0.5
        if mask.any():
            out.append(mask_layer_data(mask.astype(np.uint8), name, volume))
    present_when_added(len(out))
    return out
