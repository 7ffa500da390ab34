"""The names of the pruning methods (light: the CLI checks ``method=`` against them before importing torch)."""

METHODS = ("optin", "magnitude", "random")  # OPTIN-style trajectory scores, weight magnitude, random (a floor)
HF_METHODS = ("magnitude", "random")  # on MLLM backbones (OPTIN's scoring is written for open_clip towers)
