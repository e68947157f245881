"""``python -m medcam3d.data``: regenerate the bundled demo scan files in place."""

from medcam3d.data import write_demo_scan

for name, path in write_demo_scan(overwrite=True).items():
    print(f"{name}: {path}")
