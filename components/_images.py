"""The container images the components run in, from megasft.images (the one place they are named).

Resolved when the pipeline is compiled, so MEGASFT_IMAGE_REGISTRY / MEGASFT_IMAGE_TAG /
MEGASFT_IMAGE_CPU at compile time decide what the compiled YAML pulls. The components are KFP
lightweight Python components run in these images, which carry megasft and kfp already
(`install_kfp_package=False`: nothing is pip-installed when a step starts).
"""

from megasft.images import image_for

CPU_IMAGE = image_for("cpu").reference
"""tokenize-and-mask, conversion, evaluation, registration, and the training launcher."""
