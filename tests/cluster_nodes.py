"""Custom Ray resources that pin actors to a node of the shared test cluster (tests/conftest.py).

A module of its own (not conftest) so any test can `from cluster_nodes import SECOND_NODE`:
with several conftest.py files in the tree, `from conftest import ...` is ambiguous."""
HEAD_NODE = "test_head_node"
SECOND_NODE = "test_second_node"
