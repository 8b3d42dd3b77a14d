"""Ray cluster launcher YAMLs and KubeRay manifests."""
