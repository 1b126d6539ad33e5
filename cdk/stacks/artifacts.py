"""Artifacts and records: where bundles, component artifacts and release records live.

* ``ArtifactBucket``: KMS-encrypted (a key of its own, rotated), versioned,
  TLS-only, public access blocked, access-logged; replaced versions expire
  after ``ArtifactNoncurrentDays``. Component artifacts sit at
  ``<component>/<version>/<file>``, the path the recipes' ``s3://`` URIs use.
* ``RecordsBucket``: one JSON record per release (dataset hash, evaluation
  report, gate verdict, approver, component ARN, deployment and IoT job ids)
  under S3 Object Lock in compliance mode for ``RecordsRetentionDays``: nobody,
  root included, can change or delete a record before then.
* ``SigningKey``: an asymmetric KMS key (ECC NIST P-256, sign/verify) the
  pipeline signs bundle manifests with; devices hold only the public key.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, Duration, RemovalPolicy, Stack, Token, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from ..config import ReleaseConfig

__all__ = [
    "ArtifactsStack",
    "acknowledge",
    "artifact_bucket_name",
    "nag_account_region",
    "records_bucket_name",
    "training_role_name",
]


def nag_account_region(stack: Stack) -> tuple[str, str]:
    """Account and region as cdk-nag spells them in a finding's id.

    A finding names the resource as synthesized: tokens as ``<AWS::AccountId>``
    / ``<AWS::Region>``, known values literally (the CLI fills the region in
    from the environment), so acknowledgments must be written the same way.
    """
    account = "<AWS::AccountId>" if Token.is_unresolved(stack.account) else stack.account
    region = "<AWS::Region>" if Token.is_unresolved(stack.region) else stack.region
    return account, region


def artifact_bucket_name(prefix: str, account: str, region: str) -> str:
    """``<prefix>-artifacts-<region>-<account>``: unique per account and region, known in advance.

    In the order the GDK CLI builds its bucket name (``<bucket>-<region>-<account id>``), so
    ``gdk component publish`` with ``"bucket": "<prefix>-artifacts"`` uploads into this bucket,
    the one the devices' role may read.
    """
    return f"{prefix}-artifacts-{region}-{account}"


def records_bucket_name(prefix: str, account: str, region: str) -> str:
    """``<prefix>-records-<region>-<account>``: the release records, known in advance like the artifacts."""
    return f"{prefix}-records-{region}-{account}"


def training_role_name(prefix: str) -> str:
    """The release training job's role: named, so the signing key's policy can name it before it exists."""
    return f"{prefix}-release-training"


def acknowledge(construct: Construct, findings: list[dict[str, str]]) -> None:
    """Acknowledge cdk-nag findings on ``construct``, each with the reason it is acceptable."""
    for finding in findings:
        Validations.of(construct).acknowledge(Acknowledgment(id=finding["id"], reason=finding["reason"]))


class ArtifactsStack(Stack):
    """Buckets and keys shared by the fleet and the release pipeline."""

    def __init__(
        self, scope: Construct, construct_id: str, *, config: ReleaseConfig, **kwargs: object
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        self.data_key = kms.Key(
            self,
            "DataKey",
            description="HealthDiag: encrypts model artifacts and release records",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,  # the S3 log delivery cannot use a KMS key
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(400))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.access_logs,
            [
                {
                    "id": "HIPAA.Security::HIPAA.Security-S3BucketReplicationEnabled",
                    "reason": "Access logs stay in-region; replication is a per-deployment choice.",
                },
                {
                    "id": "HIPAA.Security::HIPAA.Security-S3DefaultEncryptionKMS",
                    "reason": "S3 server access log delivery only writes to SSE-S3 buckets.",
                },
            ],
        )
        self.artifacts = s3.Bucket(
            self,
            "ArtifactBucket",
            # A predictable name: recipes' s3:// URIs, the release command and the device role name it.
            bucket_name=artifact_bucket_name(config.name_prefix, self.account, self.region),
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.data_key,
            bucket_key_enabled=True,
            versioned=True,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="artifacts/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    noncurrent_version_expiration=Duration.days(config.artifact_noncurrent_days),
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                )
            ],
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.records = s3.Bucket(
            self,
            "RecordsBucket",
            bucket_name=records_bucket_name(config.name_prefix, self.account, self.region),
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.data_key,
            bucket_key_enabled=True,
            versioned=True,  # required by Object Lock
            object_lock_enabled=True,
            object_lock_default_retention=s3.ObjectLockRetention.compliance(
                Duration.days(config.records_retention_days)
            ),
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="records/",
            removal_policy=RemovalPolicy.RETAIN,
        )
        for bucket in (self.artifacts, self.records):
            acknowledge(
                bucket,
                [
                    {
                        "id": "HIPAA.Security::HIPAA.Security-S3BucketReplicationEnabled",
                        "reason": "Cross-region replication is a per-deployment data-residency decision "
                        "(hospital data may not leave the region); versioning and Object Lock protect them.",
                    },
                ],
            )
        self.signing_key = kms.Key(
            self,
            "SigningKey",
            description="HealthDiag: signs model bundle manifests (devices verify with the public key)",
            key_spec=kms.KeySpec.ECC_NIST_P256,
            key_usage=kms.KeyUsage.SIGN_VERIFY,
            removal_policy=RemovalPolicy.RETAIN,
        )
        # Whoever signs with this key signs fleet bundles: only the release training job may, whatever
        # an IAM policy elsewhere in the account grants (the key policy's account statement would
        # otherwise let any principal given kms:Sign sign a bundle every box trusts).
        training_role = (
            f"arn:{self.partition}:iam::{self.account}:role/{training_role_name(config.name_prefix)}"
        )
        self.signing_key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheReleaseTrainingJobSigns",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["kms:Sign"],
                resources=["*"],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": training_role}},
            )
        )
        acknowledge(
            self.signing_key,
            [
                {
                    "id": "HIPAA.Security::HIPAA.Security-KMSBackingKeyRotationEnabled",
                    "reason": "KMS does not rotate asymmetric keys; a new signing key is a new stack release "
                    "whose public key ships with the runtime.",
                }
            ],
        )
