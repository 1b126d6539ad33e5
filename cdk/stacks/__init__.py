"""The CDK stacks: artifacts and release records, the device fleet (the release pipeline is planned)."""
