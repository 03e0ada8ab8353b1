"""The GCP provider: a site is N Compute Engine instances in one zone.

See providers/__init__.py for the contract. Talks to Compute Engine through
`google.cloud.compute_v1` (REST transport), imported only when used.

A site's instances carry the labels `geotrain-run` / `geotrain-site` /
`geotrain-owner` (sanitised to GCP's label rules: lowercase; the owner id
already is), the exact run and site names as metadata items, and one network tag `geotrain-<run>-<site>`. `open_ports` creates the
firewall rule `<tag>-intra`: ingress, all protocols, from that tag to that tag
— no source range at all, so Ray is reachable only from the site's own nodes.
Instances get no external IP (they reach the store through Cloud NAT or
Private Google Access) unless the recipe's `gcp.public_ip` asks for one,
which opens no port. Spot instances are `provisioningModel: SPOT` with
`instanceTerminationAction: DELETE`, so a preempted node simply disappears
from `query`.

A node runs as the recipe's `gcp.service_account` with one OAuth scope,
`devstorage.read_write`: a node only reads and writes the run store in Cloud
Storage, so even a compromised node's token cannot call Compute Engine or any
other API, whatever roles the account holds (infra/gcp/ grants it object access
on the run bucket only). Without `service_account` the instance gets no
service account at all (not the project's default one, which often holds
Editor): it then has no Google identity. With `gcp.run_account` instead, launch
makes the site a service account of its own, granted only its run's folder of the
store, and `terminate` deletes it with the site's last node (providers/gcp/accounts.py).

The project is $GOOGLE_CLOUD_PROJECT, else the Application Default
Credentials' project — one source per process, so that `launch`, `query` and
`terminate` always look in the same project; `check()` says which.

Configuration (all non-secret): the recipe's typed options
(`SitePlan.provider_options`, providers/gcp/options.py `GcpOptions`): `service_account`
or `run_account`,
`network` (default `global/networks/default`; prefer a dedicated VPC: the
default one ships allow-internal rules), `subnetwork`, `image` (default the Deep
Learning VM family below), `accelerator` (`nvidia-tesla-t4:2`, TYPE[:COUNT],
COUNT defaulting to the plan's workers (1 for `workers: auto`: an N1 type has no GPUs
of its own in the catalog), for N1-style machine types; A2/A3/A4/G2
machine types carry their GPUs implicitly), `disk_gb`, `public_ip`.
    $GEOTRAIN_GCE_ENDPOINT  e.g. http://127.0.0.1:PORT: send every Compute
                      Engine call there (tests); `check()` shows it.
    $GEOTRAIN_GCP_IAM_ENDPOINT  the same for the IAM API (run accounts);
                      `check()` shows it. The run bucket's IAM policy goes where
                      google-cloud-storage sends it ($STORAGE_EMULATOR_HOST in tests).

Credentials are Application Default Credentials (`google.auth.default()`);
in tests the real Compute Engine credentials fetch their token from a local
metadata server (`GCE_METADATA_HOST`). No credential is ever logged.
"""

from __future__ import annotations

import functools
import os
import secrets

from geotrain import bootstrap
from geotrain.errors import CapacityError, ProviderError
from providers.gcp import accounts
from providers.gcp.compute import (ENDPOINT_ENV, _Api, _capacity_code, _credentials,  # noqa: F401
                                   _ignore_404,
                                   _OperationFailed, firewall_name, instance_name, label_value,
                                   labels, network_tag)
from providers.gcp.options import GcpOptions
from providers import Capabilities, CredentialCheck, Leftover, Node, SitePlan

DEFAULT_IMAGE = "projects/deeplearning-platform-release/global/images/family/pytorch-latest-gpu"
DEFAULT_NETWORK = "global/networks/default"
NODE_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
GPU_FAMILIES = ("a2", "a3", "a4", "g2")  # accelerator-optimized: GPUs come with the type
LIVE, PENDING = {"RUNNING"}, {"PROVISIONING", "STAGING", "REPAIRING"}


def capabilities() -> Capabilities:
    return Capabilities(spot=True, multi_node=True, preemption_notice=True, gpus=True, console=True,
                        run_resources=True)


# -- the contract -----------------------------------------------------------
def check() -> CredentialCheck:
    endpoint = (f"{os.environ[ENDPOINT_ENV]} ({ENDPOINT_ENV})" if os.environ.get(ENDPOINT_ENV)
                else "compute.googleapis.com")
    if os.environ.get(accounts.ENDPOINT_ENV):
        endpoint += f", IAM {os.environ[accounts.ENDPOINT_ENV]} ({accounts.ENDPOINT_ENV})"
    if os.environ.get("GCE_METADATA_HOST"):  # where Compute Engine credentials get tokens
        endpoint += f", metadata server {os.environ['GCE_METADATA_HOST']} (GCE_METADATA_HOST)"
    try:
        creds, project, source = _credentials()
    except Exception as e:  # DefaultCredentialsError, import errors, transport errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return CredentialCheck("gcp", False, f"no Application Default Credentials ({first}); "
                               f"run `gcloud auth application-default login` or attach a "
                               f"service account; endpoint {endpoint}")
    kind = f"{type(creds).__module__}.{type(creds).__qualname__}"
    if not project:
        return CredentialCheck("gcp", False, f"credentials found ({kind}) but no project: set "
                               f"$GOOGLE_CLOUD_PROJECT or `gcloud config set project`; "
                               f"endpoint {endpoint}")
    return CredentialCheck("gcp", True, f"project {project} (from {source}), credentials "
                           f"{kind}, endpoint {endpoint}")


def open_ports(plan: SitePlan) -> None:
    """Firewall rule `<tag>-intra`: the site's tag may reach the site's tag on
    every protocol; no source range, so nothing outside the site gets in."""
    _open_ports(plan, _Api())


def _open_ports(plan: SitePlan, api: _Api) -> None:
    from google.api_core import exceptions as gexc

    v1 = api.v1
    tag = network_tag(plan.run_id, plan.site)
    rule = v1.Firewall(
        name=firewall_name(plan.run_id, plan.site), network=_options(plan).network or DEFAULT_NETWORK,
        direction="INGRESS", priority=1000, source_tags=[tag], target_tags=[tag],
        allowed=[v1.Allowed(I_p_protocol="all")],
        description=f"geotrain run {plan.run_id} site {plan.site}: intra-site traffic only")
    try:
        op = api.firewalls.insert(project=api.project, firewall_resource=rule)
    except gexc.Conflict:
        return  # already there (a retried launch): same name, same rule
    api.wait(op.name)


def _options(plan: SitePlan) -> GcpOptions:
    return plan.provider_options or GcpOptions()


def _accelerators(plan: SitePlan, api: _Api, zone: str) -> list:
    spec = _options(plan).accelerator  # the recipe checked its form: TYPE[:COUNT]
    if not spec:
        return []  # none, or implied by an accelerator-optimized machine type (a2/a3/g2)
    kind, _, count = spec.partition(":")
    return [api.v1.AcceleratorConfig(
        accelerator_type=f"projects/{api.project}/zones/{zone}/acceleratorTypes/{kind}",
        # Default: one GPU per worker (plan.workers is a number: placement.py resolved `auto`).
        accelerator_count=int(count or plan.workers))]


def _instance(plan: SitePlan, api: _Api, zone: str, index: int, script: str,
              account: str | None = None):
    v1 = api.v1
    if not plan.instance_type:
        raise ProviderError(f"site {plan.site}: gcp needs an instance_type (machine type), "
                            "e.g. g2-standard-8")
    accelerators = _accelerators(plan, api, zone)
    gpu = bool(accelerators) or plan.instance_type.split("-")[0] in GPU_FAMILIES
    if plan.spot:
        scheduling = v1.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE",
                                   on_host_maintenance="TERMINATE", automatic_restart=False)
    else:
        # GPUs cannot live-migrate; plain CPU machines can.
        scheduling = v1.Scheduling(provisioning_model="STANDARD", automatic_restart=True,
                                   on_host_maintenance="TERMINATE" if gpu else "MIGRATE")
    opts = _options(plan)
    nic = v1.NetworkInterface(network=opts.network or DEFAULT_NETWORK)
    if opts.subnetwork:
        nic.subnetwork = opts.subnetwork
    if opts.public_ip:  # else no accessConfigs at all: no external address
        nic.access_configs = [v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    metadata = [("startup-script", script), ("geotrain-run", plan.run_id),
                ("geotrain-site", plan.site)]
    if gpu:  # Deep Learning VM images install the driver at first boot when asked
        metadata.append(("install-nvidia-driver", "True"))
    # Only the site's run account, or the account the recipe names; none at all otherwise.
    email = account or opts.service_account
    identity = [v1.ServiceAccount(email=email, scopes=list(NODE_SCOPES))] if email else []
    return v1.Instance(
        name=instance_name(plan.run_id, plan.site, index),
        machine_type=f"zones/{zone}/machineTypes/{plan.instance_type}",
        labels=labels(plan.run_id, plan.site, plan.owner),
        tags=v1.Tags(items=[network_tag(plan.run_id, plan.site)]),
        scheduling=scheduling, guest_accelerators=accelerators,
        metadata=v1.Metadata(items=[v1.Items(key=k, value=v) for k, v in metadata]),
        network_interfaces=[nic],
        disks=[v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=(
            v1.AttachedDiskInitializeParams(source_image=opts.image or DEFAULT_IMAGE,
                                            disk_size_gb=opts.disk_gb)))],
        service_accounts=identity)


def _zones(plan: SitePlan, api: _Api) -> list[str]:
    if plan.zones:
        return list(plan.zones)
    if not plan.region:
        raise ProviderError(f"site {plan.site}: gcp needs a region or zones, e.g. us-central1")
    return sorted(z.name for z in api.zones.list(project=api.project)
                  if z.name.startswith(plan.region + "-") and z.status == "UP")


def _delete_instances(api: _Api, where: list[tuple[str, str]]) -> None:
    ops = [(zone, _ignore_404(api.instances.delete, project=api.project, zone=zone,
                              instance=name)) for zone, name in where]
    for zone, op in ops:
        if op is not None:
            try:
                api.wait(op.name, zone)
            except _OperationFailed as e:
                raise ProviderError(f"GCE could not delete an instance in {zone}: {e}") from e


def _delete_firewall(api: _Api, run_id: str, site: str) -> None:
    op = _ignore_404(api.firewalls.delete, project=api.project,
                     firewall=firewall_name(run_id, site))
    if op is not None:
        api.wait(op.name)


def _node(api: _Api, inst, run_id: str, site: str, zone: str) -> Node:
    state = ("running" if inst.status in LIVE else "pending" if inst.status in PENDING
             else "terminated")
    ip = inst.network_interfaces[0].network_i_p if inst.network_interfaces else None
    return Node(run_id, site, "gcp", inst.name, state, private_ip=ip or None, region=zone,
                owner=inst.labels.get("geotrain-owner") or None)


def launch(plan: SitePlan) -> list[Node]:
    api = _Api()
    ray_token = secrets.token_hex(32)
    scripts = [bootstrap.render(plan, i, ray_token) for i in range(plan.nodes)]
    zones = _zones(plan, api)
    _open_ports(plan, api)
    account, made = None, False
    try:
        if _options(plan).run_account:
            made = True
            account = _make_run_account(plan, api)
        return _launch_in_zones(plan, api, zones, scripts, account)
    except BaseException:
        if made:
            try:
                _remove_run_account_if_unused(api, plan.run_id, plan.site)
            except Exception:  # noqa: BLE001 - never mask the launch error
                pass
        raise


def _launch_in_zones(plan: SitePlan, api: _Api, zones: list[str], scripts: list[str],
                     account: str | None) -> list[Node]:
    from google.api_core import exceptions as gexc

    tried: list[str] = []
    for zone in zones:
        created: list[tuple[str, str]] = []
        try:
            ops = []
            for i in range(plan.nodes):
                resource = _instance(plan, api, zone, i, scripts[i], account)
                insert = functools.partial(api.instances.insert, project=api.project, zone=zone,
                                           instance_resource=resource)
                # GCE may not see a run account made a moment ago (IAM is eventually consistent).
                ops.append(accounts.while_unseen(insert, account) if account else insert())
                created.append((zone, resource.name))
            for op in ops:
                api.wait(op.name, zone)
            insts = [api.instances.get(project=api.project, zone=zone, instance=name)
                     for _, name in created]
            return [_node(api, inst, plan.run_id, plan.site, zone) for inst in insts]
        except (gexc.GoogleAPICallError, _OperationFailed) as e:
            _delete_instances(api, created)
            code = _capacity_code(e)
            if code is None:
                _delete_firewall(api, plan.run_id, plan.site)
                raise ProviderError(f"GCE refused site {plan.site} in {zone}: {e}") from e
            tried.append(f"gcp:{zone} ({code})")
        except BaseException:
            _delete_instances(api, created)
            _delete_firewall(api, plan.run_id, plan.site)
            raise
    _delete_firewall(api, plan.run_id, plan.site)
    raise CapacityError(f"no GCE zone had room for {plan.nodes} x {plan.instance_type}"
                        f"{' (spot)' if plan.spot else ''} for site {plan.site}", tried)


# -- run accounts (gcp.run_account; providers/gcp/accounts.py) ----------------
def _iam(api: _Api) -> accounts.Iam:
    return accounts.Iam(api.credentials, api.project)


def _bucket_of(api: _Api):
    """name -> the google.cloud.storage Bucket, with the operator's credentials."""
    from google.cloud import storage

    client = storage.Client(project=api.project, credentials=api.credentials)
    return client.bucket


def _make_run_account(plan: SitePlan, api: _Api) -> str:
    """The site's run account, made and granted its run's folder; its email."""
    from google.api_core import exceptions as gexc

    try:
        bucket, _ = accounts.run_folder(plan.store_url)
        return accounts.ensure_run_account(_iam(api), _bucket_of(api)(bucket), plan.run_id,
                                           plan.site, plan.owner, plan.store_url)
    except (gexc.GoogleAPICallError, ProviderError) as e:
        _delete_firewall(api, plan.run_id, plan.site)
        if isinstance(e, ProviderError):
            raise
        raise ProviderError(f"site {plan.site}: could not make its run service account "
                            f"(gcp.run_account): {_first_line(e)}; the operator needs the rights "
                            "infra/gcp/README.md lists") from e


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _remove_run_account(api: _Api, run_id: str, site: str) -> None:
    """Remove the site's run account and its bindings from its run bucket."""
    accounts.remove_run_account(_iam(api), _bucket_of(api),
                                accounts.account_email(api.project, run_id, site))


def _remove_run_account_if_unused(api: _Api, run_id: str, site: str) -> None:
    """Remove the site's run account once no instance of the site is left."""
    if not _query(api, run_id, site):
        _remove_run_account(api, run_id, site)


def _run_account_sites(api: _Api, where: list[tuple[str, Node]]) -> set[tuple[str, str]]:
    """The (run, site) pairs among these instances ((zone, node)) that run as their site's
    own run account: only those have an account for `terminate` to delete."""
    out, seen = set(), set()
    for zone, n in where:
        if (n.run_id, n.site) in seen:
            continue
        inst = _ignore_404(api.instances.get, project=api.project, zone=zone, instance=n.instance_id)
        if inst is None:
            continue  # gone already: another node of the site may tell
        seen.add((n.run_id, n.site))
        email = accounts.account_email(api.project, n.run_id, n.site)
        if any(a.email == email for a in inst.service_accounts):
            out.add((n.run_id, n.site))
    return out


def leftovers(run_id: str | None = None) -> list[Leftover]:
    """The run accounts (gcp.run_account) of `run_id`, or of every run, still in the project."""
    from google.api_core import exceptions as gexc

    api = _Api()
    try:
        found = accounts.run_accounts(_iam(api))
    except gexc.GoogleAPICallError as e:
        raise ProviderError(f"could not list geotrain's run service accounts in project "
                            f"{api.project}: {_first_line(e)}") from e
    return [Leftover("gcp", a["run"], a["site"], "service-account", a["email"], a["owner"])
            for a in found if run_id is None or a["run"] == run_id]


def remove(leftovers: list[Leftover]) -> list[Leftover]:
    """Remove these run accounts' bindings from their run bucket, then delete them."""
    from google.api_core import exceptions as gexc

    if not leftovers:
        return []
    api, gone = _Api(), []
    iam, bucket_of = _iam(api), _bucket_of(api)
    try:
        for leftover in leftovers:
            accounts.remove_run_account(iam, bucket_of, leftover.name)
            gone.append(leftover)
    except gexc.GoogleAPICallError as e:
        raise ProviderError(f"could not delete a geotrain run service account: "
                            f"{_first_line(e)}") from e
    return gone


def query(run_id: str, site: str | None = None, regions: list[str] | None = None) -> list[Node]:
    api = _Api()  # one aggregatedList covers every zone: `regions` is not needed
    return _query(api, run_id, site)


def query_all() -> list[Node]:
    """Every instance of the project carrying geotrain's run metadata, of any
    run (for `geotrain down --orphans`)."""
    api = _Api()
    request = api.v1.AggregatedListInstancesRequest(project=api.project)
    nodes = []
    for scope, scoped in api.instances.aggregated_list(request=request):
        zone = scope.rsplit("/", 1)[-1]
        for inst in scoped.instances:
            meta = {i.key: i.value for i in inst.metadata.items}
            if meta.get("geotrain-run"):
                nodes.append(_node(api, inst, meta["geotrain-run"],
                                   meta.get("geotrain-site", ""), zone))
    return sorted(nodes, key=lambda n: (n.run_id, n.site, n.instance_id))


def _query(api: _Api, run_id: str, site: str | None) -> list[Node]:
    want = labels(run_id, site or "")
    filt = f'labels.geotrain-run = "{want["geotrain-run"]}"'
    if site is not None:
        filt += f' AND labels.geotrain-site = "{want["geotrain-site"]}"'
    request = api.v1.AggregatedListInstancesRequest(project=api.project, filter=filt)
    nodes = []
    for scope, scoped in api.instances.aggregated_list(request=request):
        zone = scope.rsplit("/", 1)[-1]
        for inst in scoped.instances:
            meta = {i.key: i.value for i in inst.metadata.items}
            # Labels are sanitised; the metadata keeps the exact names.
            if meta.get("geotrain-run", run_id) != run_id:
                continue
            name = meta.get("geotrain-site", inst.labels.get("geotrain-site", ""))
            if site is None or name == site:
                nodes.append(_node(api, inst, run_id, name, zone))
    return sorted(nodes, key=lambda n: (n.site, n.instance_id))


def terminate(nodes: list[Node]) -> list[Node]:
    """Delete each instance (its boot disk goes with it, autoDelete), wait for
    the operations, then delete a site's firewall rule (and its run account, when its
    instances ran as one) once none of its instances is left. Unknown instances (404)
    count as already gone."""
    if not nodes:
        return []
    from google.api_core import exceptions as gexc

    api = _Api()
    where = []
    for n in nodes:
        zone = n.region or next((m.region for m in _query(api, n.run_id, n.site)
                                 if m.instance_id == n.instance_id), None)
        if zone:
            where.append((zone, n))
    own = _run_account_sites(api, where)
    _delete_instances(api, [(zone, n.instance_id) for zone, n in where])
    for run_id, site in sorted({(n.run_id, n.site) for n in nodes}):
        if not _query(api, run_id, site):
            _delete_firewall(api, run_id, site)
            if (run_id, site) in own:
                try:
                    _remove_run_account(api, run_id, site)
                except gexc.GoogleAPICallError as e:
                    raise ProviderError(f"site {site}: its nodes are gone but its run service "
                                        f"account could not be removed: {_first_line(e)}; "
                                        "`geotrain down --orphans` retries") from e
    return [Node(n.run_id, n.site, n.provider, n.instance_id, "terminated", n.private_ip, n.pid,
                 n.region) for n in nodes]


def console(node: Node) -> str:
    """The node's serial port 1 output (instances.getSerialPortOutput): where a node
    that cannot reach the run store says why (geotrain/site/node_info.py)."""
    api = _Api()
    return api.instances.get_serial_port_output(project=api.project, zone=node.region,
                                                instance=node.instance_id).contents or ""
