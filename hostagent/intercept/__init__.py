"""eBPF interception: the agentgate cgroup tree, the BPF programs on it, identities."""
