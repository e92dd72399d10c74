"""Merges: the launcher (method, experts, parameters), the job list, and a job page whose progress
fragment HTMX polls until the job ends, with a cancel button and a link to the merged expert."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery
from litestar.plugins.htmx import HTMXRequest, HTMXTemplate
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin.views import PAGE_SIZE, FormErrors, Pager, expert_picker, json_object, split_slugs
from api.merges.controllers import submit_job
from api.schemas import PageOffset, job_out, jobs_out
from core.errors import MoergeError, ValidationFailed
from merging.jobs import MergeJobService
from merging.methods import METHODS
from registry.jobs import STATUSES, TERMINAL, JobService, job_progress
from registry.models import ExpertKind
from registry.services import ExpertService
from registry.store import ArtifactStore

OUTPUT_FORMATS = ("full", "lora", "cat")
# a refusal's `param` (or its head) -> the launcher's field
FIELD_OF = {
    "merge_method": "method",
    "models": "models",
    "base_model": "base_model",
    "parameters": "parameters",
    "name": "name",
    "output": "output",
    "dtype": "parameters",
    "model_parameters": "model_parameters",
    "more_models": "models",
}
BASE_KINDS = [k.value for k in ExpertKind if k != ExpertKind.adapter]


def _service(db_session: NamedDependency[AsyncSession], store: NamedDependency[ArtifactStore]) -> MergeJobService:
    return MergeJobService(db_session, store)


def _number(text: str, slug: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise ValidationFailed(f"the weight of {slug} must be a number", param="models") from None


def _models(form: Any) -> dict[str, float | None]:
    """Each chosen expert with its weight (None: the method's default): the ticked ones, then the typed
    ``slug`` or ``slug=weight`` items (experts past the launcher's list)."""
    chosen = {
        slug: _number(str(form.get(f"weight:{slug}") or ""), slug) for slug in map(str, form.getall("models", []))
    }
    for item in split_slugs(str(form.get("more_models") or "")):
        slug, _, weight = item.partition("=")
        chosen[slug] = _number(weight, slug)
    return chosen


def _request(form: Any) -> dict[str, Any]:
    """The launcher's form as a merge request (the API's JSON shape: the same checks refuse it)."""
    shared = json_object(form, "model_parameters")
    models = []
    for slug, weight in _models(form).items():
        models.append({"model": slug, "parameters": {**shared, **({"weight": weight} if weight is not None else {})}})
    body: dict[str, Any] = {
        "merge_method": str(form.get("method") or ""),
        "models": models,
        "parameters": json_object(form, "parameters"),
        "output": {"format": str(form.get("output") or "full")},
        "description": str(form.get("description") or ""),
    }
    if base := str(form.get("base_model") or "").strip():
        body["base_model"] = base
    if name := str(form.get("name") or "").strip():
        body["name"] = name
    return body


class MergePages(Controller):
    path = "/admin/merges"
    dependencies = {"merges": Provide(_service, sync_to_thread=False)}

    async def _page(
        self,
        merges: MergeJobService,
        values: dict[str, Any],
        errors: FormErrors,
        *,
        status_filter: str | None = None,
        offset: int = 0,
        code: int = 200,
    ) -> Template:
        page = await merges.list_jobs(status=status_filter or None, limit=PAGE_SIZE, offset=max(0, offset))
        service = ExpertService(merges.session, merges.store)
        return Template(
            "merges.html",
            context={
                "jobs": await jobs_out(merges, page.items),
                "pager": Pager(page.total, page.offset, PAGE_SIZE, {"status": status_filter or ""}),
                "statuses": STATUSES,
                "status": status_filter or "",
                "methods": METHODS.names(),
                "formats": OUTPUT_FORMATS,
                "picker": await expert_picker(service),
                "bases": await expert_picker(service, BASE_KINDS),
                "values": values,
                "errors": errors,
            },
            status_code=code,
        )

    @get("/")
    async def list_page(
        self, merges: NamedDependency[MergeJobService], status: FromQuery[str | None] = None, offset: PageOffset = 0
    ) -> Template:
        values = {"method": "ties", "models": [], "output": "full", "parameters": "", "model_parameters": ""}
        return await self._page(merges, values, FormErrors(), status_filter=status, offset=offset)

    @post("/")
    async def launch(self, request: Request[Any, Any, Any], merges: NamedDependency[MergeJobService]) -> Response[Any]:
        form = await request.form()
        try:
            job = await submit_job(merges, request.app.state, _request(form))
        except MoergeError as exc:
            await merges.session.rollback()
            values: dict[str, Any] = {
                k: str(form.get(k) or "") for k in ("name", "method", "base_model", "output", "description")
            }
            values |= {k: str(form.get(k) or "") for k in ("parameters", "model_parameters", "more_models")}
            values["models"] = [str(s) for s in form.getall("models", [])]
            values["weights"] = {s: str(form.get(f"weight:{s}") or "") for s in values["models"]}
            return await self._page(merges, values, FormErrors.of(exc, FIELD_OF), code=exc.status_code)
        return Redirect(f"/admin/merges/{job.id}", status_code=HTTP_303_SEE_OTHER)

    @get("/{job_id:str}")
    async def job_page(self, job_id: FromPath[str], merges: NamedDependency[MergeJobService]) -> Template:
        """Any job's page (a merge, or the `fit` job a composition form queued), with its live progress."""
        jobs = JobService(merges.session)
        summary = await job_out(jobs, await jobs.get(job_id))
        return Template("merge_job.html", context={"job": summary, "terminal": summary.status in TERMINAL})

    @get("/{job_id:str}/progress")
    async def progress(self, job_id: FromPath[str], merges: NamedDependency[MergeJobService]) -> Template:
        """The moving part, polled by the job page (it stops polling once the job has ended)."""
        jobs = JobService(merges.session)
        event = job_progress(*(await jobs.with_result_slug(await jobs.get(job_id))))
        return Template("fragments/progress.html", context={"job": event, "terminal": event["status"] in TERMINAL})

    @post("/{job_id:str}/cancel")
    async def cancel(
        self, job_id: FromPath[str], request: HTMXRequest, merges: NamedDependency[MergeJobService]
    ) -> Response[Any]:
        jobs = JobService(merges.session)
        job = await jobs.cancel(job_id)
        if request.htmx:  # the button's form swaps the progress section in place
            event = job_progress(*(await jobs.with_result_slug(job)))
            context = {"job": event, "terminal": event["status"] in TERMINAL}
            return HTMXTemplate(template_name="fragments/progress.html", context=context)
        return Redirect(f"/admin/merges/{job.id}", status_code=HTTP_303_SEE_OTHER)
