"""Cloud side: the release command (``python -m cdk.release``); the CDK app is planned (issue 12)."""
