"""The MCP endpoint for agents on other machines, and the page where people manage tokens."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import RequestDataTooBig, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from pull_api.models import NAME, ApiToken, NameTaken
from workqueue.names import validate_queue_name
from workqueue.pull import PullSession
from workqueue.routing import FilterError, TaskFilter

# Only these travel from the transport's answer to the client.
ANSWER_HEADERS = ("content-type", "mcp-session-id", "mcp-protocol-version", "allow")


def _refuse(status: int, message: str, **headers) -> JsonResponse:
    return JsonResponse({"error": message}, status=status, headers=headers)


# Exempt from CSRF: this endpoint is authenticated only by a bearer token in the
# Authorization header, which a browser never attaches on its own, and never by the session
# cookie; a forged cross-site request carries no token and gets 401.
@csrf_exempt
@never_cache
# POST only: the stateless JSON-response transport has no stream to GET and no session
# to DELETE (a GET would wait for a stream that never comes).
@require_POST
def mcp_endpoint(request: HttpRequest) -> HttpResponse:
    kind, _, secret = request.headers.get("Authorization", "").partition(" ")
    token = ApiToken.authenticate(secret.strip()) if kind.lower() == "bearer" else None
    if token is None:
        return _refuse(
            401,
            "a valid API token is required: Authorization: Bearer hv_… (create one at /tokens/)",
            **{"WWW-Authenticate": 'Bearer realm="hypervisor"'},
        )
    try:
        body = request.body
    except RequestDataTooBig:  # Django's own answer is an HTML page saying nothing
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return _refuse(413, f"the request body is over the {limit:,}-byte limit")
    queue = request.GET.get("queue", "")
    try:
        validate_queue_name(queue)
        filters = TaskFilter.parse(request.GET.getlist("where"))
    except ValidationError as exc:
        return _refuse(400, f"add ?queue=NAME to the URL: {exc.messages[0]}")
    except FilterError as exc:
        return _refuse(400, f"where: {exc}")
    # Imported here: the MCP SDK takes half a second to load, and every management command
    # that runs Django's checks loads this module through the URLconf.
    from workqueue.mcp_server import serve_http_request

    session = PullSession(
        queue,
        token.identity(),
        filters,
        settings.HYPERVISOR_MCP_LEASE_SECONDS,
        stateless=True,
        permitted=token.permits,
    )
    try:
        answer = serve_http_request(
            session,
            request.method,
            request.path,
            request.META.get("QUERY_STRING", "").encode("latin-1"),
            list(request.headers.items()),
            body,
        )
    finally:
        session.owner_file.discard()  # its locks keep their link to the owner record
    response = HttpResponse(bytes(answer.body), status=answer.status)
    for name, value in answer.headers:
        if name.lower() in ANSWER_HEADERS:
            response[name] = value
    return response


NAME_TAKEN = "You already have a token of that name."
# Tokens stay listed once revoked: a page at a time (2,000 were 600 KB and 0.2-0.4 s).
TOKENS_PER_PAGE = 50


class TokenForm(forms.Form):
    name = forms.CharField(max_length=50, validators=[NAME], help_text="e.g. laptop-claude")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if ApiToken.objects.filter(user=self.user, name=name).exists():
            raise ValidationError(NAME_TAKEN)
        return name


# A token can do nothing for a person who cannot see the queue, so the page asks as much.
@never_cache
@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    form = TokenForm(request.POST or None, user=request.user)
    secret = None
    created = None
    if request.method == "POST" and form.is_valid():
        try:
            created, secret = ApiToken.issue(request.user, form.cleaned_data["name"])
            form = TokenForm(user=request.user)
        except NameTaken:  # taken since the form's check (Create sent twice)
            form.add_error("name", NAME_TAKEN)
    context = {
        "form": form,
        "tokens": Paginator(
            ApiToken.objects.filter(user=request.user).order_by("-created_at", "-id"),
            TOKENS_PER_PAGE,
        ).get_page(request.GET.get("page")),
        "created": created,
        "secret": secret,  # shown on this response only
        "endpoint": request.build_absolute_uri("/mcp/"),
        "can_view": request.user.has_perm("queue.view_task"),
        "can_change": request.user.has_perm("queue.change_task"),
    }
    return render(request, "pull_api/tokens.html", context, status=201 if secret else 200)


@login_required
@permission_required("queue.view_task", raise_exception=True)
@require_POST
def revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)
    token.revoke(by=request.user.get_username())
    return redirect("pull_api:tokens")
