"""Conditional digits (domain x digit): data, model, training, sampling, judges and evaluation. Importing the
package registers the digits model with the DDIM jobs (`difflab.digits.eps`)."""

from difflab.digits import eps as _eps  # noqa: F401  (registers "digits_unet" with difflab.ddim.models)
