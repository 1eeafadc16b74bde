"""Seismic volume I/O: `synth` makes volumes, `write` stores them as MDIO, `volume` reads boxes back."""
