"""A node agent for the emulated cluster: plays the kubelet and the workload controllers for real.

The API-server emulator (tests/emulator) stores Jobs, PyTorchJobs, DeepSpeedJobs, TrainJobs and Deployments but
runs nothing. :class:`NodeAgent` watches its store and runs each pod's containers in their images with
``buildah run`` (vfs storage, chroot isolation; images from scripts/build-images.sh), then writes back the
status the real controller would. What it honours and what chroot isolation cannot: README.md here.

    agent = NodeAgent(emulator_server, tmp_path / "node", node_env={...}).start()
    ...
    agent.stop()

Modules: ``buildah`` (containers and processes), ``pods`` (the kubelet: volumes, env, users, hosts),
``controllers`` (one class per workload kind; T9k's ``deepspeed`` and Trainer v2's ``trainjob`` in modules of
their own), ``agent`` (the watch loop and the registry), ``hub`` (a stand-in for the Hugging Face Hub).
"""

from tests.node_agent.agent import NodeAgent
from tests.node_agent.buildah import available
from tests.node_agent.pods import ContainerRecord

__all__ = ["ContainerRecord", "NodeAgent", "available"]
