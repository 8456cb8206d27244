"""Example apps built on Kaya's public API (`import kaya`); the runtime imports none of them."""
