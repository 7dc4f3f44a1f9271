"""A built-in OpenAI/OpenRouter-compatible chat-completions server for tests, demos and benchmarks.

It listens on 127.0.0.1 only, answers deterministically for a given request body and seed, shapes
bodies, errors and headers like OpenRouter, OpenAI, vLLM or llama.cpp, and injects faults (random
rates or a scripted plan by arrival number), rate limits, credit exhaustion and latency.

    sim = Simulator(SimConfig(flavor="openrouter", seed=0))
    base_url = await sim.start()            # POST {base_url}/chat/completions
    ...
    await sim.stop()

    with SimulatorThread(cfg) as base_url:  # background thread with its own event loop
        ...
"""

from .cli import add_arguments, config_from_args, serve
from .config import (
    FAULT_NAMES,
    RATE_FAULTS,
    FaultRule,
    Price,
    SimConfig,
    load_fault_plan,
)
from .server import Simulator
from .thread import SimulatorThread

__all__ = [
    "FAULT_NAMES", "RATE_FAULTS", "FaultRule", "Price", "SimConfig", "Simulator", "SimulatorThread",
    "add_arguments", "config_from_args", "load_fault_plan", "serve",
]
