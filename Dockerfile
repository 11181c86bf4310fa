# The subq node image: the rayproject/ray image of the pinned Ray + this checkout, installed by the same script the
# cluster launcher runs on every node (cluster/install_node.sh). KubeRay manifests (cluster/kuberay/) use it.
#   docker build --build-arg KIND=cpu -t subq:2.60.0-py310-cpu .
#   docker build --build-arg KIND=gpu -t subq:2.60.0-py310-gpu .
# The FROM tag carries the Ray version (pyproject.toml's pin) and the Python; `subq cluster check` compares them.
ARG KIND=cpu
FROM rayproject/ray:2.60.0-py310-${KIND}
ARG KIND
COPY --chown=ray:users . /home/ray/subq
RUN bash /home/ray/subq/cluster/install_node.sh ${KIND}
