# Vendored verbatim from Meituan-AutoML/MobileVLM, mobilevlm/constants.py, at repository commit
# 688fdec914810485c8766da96c63d9d2ce15f750 (the file last changed in
# 5d53a994984f827615eae334777552e7e851d896). Everything below the line of dashes is the
# upstream file byte for byte (check: `git show 688fdec:mobilevlm/constants.py | sha256sum` is
# e7af5c136052b661fee486db9c139ad86093fc5d6ec33c51fe2a92d0181dfde5,
# the sha256 of this file from the line after the dashes on; tools/make_mobilevlm_fixtures.py
# checks it before loading). Nothing in this repository edits it.
#
# MobileVLM (c) its authors (Meituan-AutoML). Licensed under the Apache License, Version 2.0
# (the repository's LICENSE file); the upstream file itself carries no header.
# ----------------------------------------------------------------------------------------
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15

LOGDIR = "."

# Model Constants
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"