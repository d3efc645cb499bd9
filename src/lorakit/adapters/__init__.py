"""Adapter algorithms: pure ΔW math (functional/) and parameter-owning modules (modules/)."""
