"""Web forms: they turn form fields into the arguments of hub services, and show
the services' errors (hub.errors.QuiverError) next to the field they name."""
from __future__ import annotations

from django import forms

from hub import selectors
from hub.errors import QuiverError
from hub.models import Visibility
from hub.services.compositions import MAX_ADAPTERS, MERGE_DTYPES
from hub.services.generations import MAX_DESCRIPTION_CHARS, MAX_K

SORT_LABELS = {
    "relevance": "Best match", "updated": "Recently updated", "created": "Newest", "name": "Name (A–Z)",
    "largest": "Most parameters", "smallest": "Fewest parameters",
}


class ServiceErrorsMixin:
    """Put a service's error next to its field; errors about a group of fields
    (the adapter list, the method parameters) go to that group's fieldset."""

    groups: tuple[str, ...] = ()

    def add_service_error(self, error: QuiverError) -> None:
        if error.field in self.fields:
            self.add_error(error.field, error.message)
        elif error.field in self.groups:
            self.group_errors.setdefault(error.field, []).append(error.message)
        else:
            self.add_error(None, error.message)

    @property
    def group_errors(self) -> dict[str, list[str]]:
        if not hasattr(self, "_group_errors"):
            self._group_errors = {}
        return self._group_errors


def base_model_choices(blank: str | None) -> list[tuple[str, str]]:
    names = [(base.full_name, base.full_name) for base in selectors.base_model_list()]
    return ([("", blank)] if blank is not None else []) + names


class SearchForm(forms.Form):
    """Browse and search: GET parameters, all optional."""

    q = forms.CharField(required=False, max_length=2000, label="Describe the task",
                        widget=forms.TextInput(attrs={"type": "search", "placeholder": "e.g. summarise support tickets"}))
    base_model = forms.ChoiceField(required=False, label="Base model")
    format = forms.ChoiceField(required=False, label="Format")
    license = forms.ChoiceField(required=False, label="License")
    tag = forms.CharField(required=False, max_length=64, label="Tag",
                          widget=forms.TextInput(attrs={"list": "tag-choices"}))
    sort = forms.ChoiceField(required=False, label="Sort by", choices=list(SORT_LABELS.items()))

    def __init__(self, data, *, facets: dict):
        super().__init__(data)
        self.fields["base_model"].choices = base_model_choices("Any base model")
        self.fields["format"].choices = [("", "Any format")] + [(value, value) for value in facets["formats"]]
        self.fields["license"].choices = [("", "Any license")] + [(value, value) for value in facets["licenses"]]


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files in one input (Django's documented pattern)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        files = data if isinstance(data, (list, tuple)) else [data]
        return [super(MultipleFileField, self).clean(item, initial) for item in files]


def split_tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


class UploadForm(ServiceErrorsMixin, forms.Form):
    files = MultipleFileField(
        label="Files",
        help_text="A PEFT adapter (adapter_config.json and adapter_model.safetensors, optionally README.md) "
                  "or one single-file LoRA (.safetensors from kohya or diffusers). Pickle files are refused.")
    namespace = forms.CharField(max_length=96, help_text="Your user name (staff may upload anywhere).")
    name = forms.CharField(max_length=96, help_text="Letters, digits, '.', '_' and '-'.")
    base_model = forms.ChoiceField(required=False, label="Base model",
                                   help_text="Required for PEFT unless adapter_config.json names a registered model.")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 5}),
                                  help_text="What the adapter does, in words (Markdown); search reads it.")
    tags = forms.CharField(required=False, max_length=2000, help_text="Comma-separated, e.g. summarization, legal.")
    license = forms.CharField(required=False, max_length=64, help_text="e.g. apache-2.0")
    visibility = forms.ChoiceField(choices=Visibility.choices, initial=Visibility.PUBLIC, widget=forms.RadioSelect,
                                   help_text="Private adapters are visible only to you.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["base_model"].choices = base_model_choices("— as adapter_config.json says / none —")

    def service_arguments(self) -> dict:
        data = self.cleaned_data
        return {"namespace": data["namespace"], "name": data["name"], "base_model": data["base_model"] or None,
                "description": data["description"], "tags": split_tags(data["tags"]), "license": data["license"],
                "visibility": data["visibility"]}


# Parameters some composition methods read (hub.services.compositions checks them).
PARAM_FIELDS = {
    "rank": lambda: forms.IntegerField(required=False, min_value=1, label="Rank"),
    "density": lambda: forms.FloatField(required=False, label="Density", help_text="The kept fraction, in (0, 1]"),
    "majority_sign": lambda: forms.ChoiceField(required=False, label="Majority sign",
                                               choices=[("", "default"), ("total", "total"), ("frequency", "frequency")]),
    "seed": lambda: forms.IntegerField(required=False, min_value=0, label="Seed"),
    "iso_scale": lambda: forms.FloatField(required=False, label="Iso-C scale"),
}


class AdapterPicksForm(ServiceErrorsMixin, forms.Form):
    """Adapters with weights, a method and its parameters: what compositions and merges take.

    Adapter rows are numbered fields (adapter_0, weight_0, ...): the page starts with
    `rows` of them and a few lines of JS may add more (up to MAX_ADAPTERS)."""

    groups = ("adapters", "params")
    method = forms.ChoiceField(label="Method")

    def __init__(self, data=None, *, rows: int = 2, initial_adapters: list[str] = (), **kwargs):
        super().__init__(data, **kwargs)
        if data is not None:
            rows = sum(1 for index in range(MAX_ADAPTERS) if f"adapter_{index}" in data)
        self.row_count = max(rows, len(initial_adapters), 1)
        for index in range(self.row_count):
            self.fields[f"adapter_{index}"] = forms.CharField(
                required=False, label=f"Adapter {index + 1}", max_length=300,
                widget=forms.TextInput(attrs={"list": "adapter-choices", "placeholder": "namespace/name"}),
                initial=initial_adapters[index] if index < len(initial_adapters) else "")
            self.fields[f"weight_{index}"] = forms.FloatField(
                required=False, label=f"Weight {index + 1}", initial=1.0,
                widget=forms.NumberInput(attrs={"step": "any"}))
        methods = selectors.compose_methods()
        self.fields["method"].choices = [
            (m.name, f"{m.name} — {'exact' if m.exact else 'approximate'}") for m in methods]
        for name, make in PARAM_FIELDS.items():
            field = make()
            users = [m.name for m in methods if name in m.params]
            field.help_text = ". ".join(filter(None, [field.help_text, f"Used by: {', '.join(users)}."]))
            self.fields[name] = field

    def adapter_rows(self):
        return [(self[f"adapter_{index}"], self[f"weight_{index}"]) for index in range(self.row_count)]

    def param_fields(self):
        return [self[name] for name in PARAM_FIELDS]

    def adapter_refs(self) -> list[dict]:
        data = self.cleaned_data
        return [{"id": data[f"adapter_{index}"].strip(), "weight": 1.0 if data[f"weight_{index}"] is None
                 else data[f"weight_{index}"]}
                for index in range(self.row_count) if data.get(f"adapter_{index}", "").strip()]

    def method_params(self) -> dict:
        return {name: self.cleaned_data[name] for name in PARAM_FIELDS if self.cleaned_data.get(name) not in (None, "")}


class ComposeForm(AdapterPicksForm):
    name = forms.CharField(required=False, max_length=96, label="New adapter name",
                           help_text="Optional; a name is made from the method and inputs when empty.")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    visibility = forms.ChoiceField(choices=Visibility.choices, initial=Visibility.PUBLIC, widget=forms.RadioSelect)

    def service_arguments(self) -> dict:
        data = self.cleaned_data
        return {"adapters": self.adapter_refs(), "method": data["method"], "params": self.method_params(),
                "name": data["name"] or None, "description": data["description"], "visibility": data["visibility"]}


class MergeForm(AdapterPicksForm):
    base_model = forms.ChoiceField(label="Base model")
    dtype = forms.ChoiceField(required=False, label="Data type of the merged weights",
                              choices=[("", "same as the base model")] + [(d, d) for d in MERGE_DTYPES])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["base_model"].choices = base_model_choices(None)
        self.fields["method"].initial = "linear"

    def service_arguments(self) -> dict:
        data = self.cleaned_data
        return {"base_model": data["base_model"], "adapters": self.adapter_refs(), "method": data["method"],
                "params": self.method_params(), "dtype": data["dtype"] or None}


class GenerateForm(ServiceErrorsMixin, forms.Form):
    """A task description → a generated adapter. The fields only carry the values (select and
    radio widgets on plain fields): hub.services.generations.request_generation checks them,
    with the same rules and messages as for the API."""

    description = forms.CharField(
        required=False, strip=False, label="Describe the task",
        widget=forms.Textarea(attrs={"rows": 4, "placeholder": "e.g. Is this text a job title written in Polish?"}),
        help_text=f"What the new adapter should do, in a sentence or two (at most {MAX_DESCRIPTION_CHARS} characters).")
    base_model = forms.CharField(required=False, label="Base model", widget=forms.Select,
                                 help_text="Only base models with a trained generator are listed.")
    method = forms.CharField(required=False, label="Method", widget=forms.RadioSelect)
    k = forms.IntegerField(required=False, label="Experts to draw on (k)",
                           help_text=f"Optional, 1 to {MAX_K}; empty uses the generator's own setting.")
    name = forms.CharField(required=False, max_length=96, label="New adapter name",
                           help_text="Optional; a name is made from the description when empty.")
    visibility = forms.CharField(required=False, initial=Visibility.PUBLIC, label="Visibility",
                                 widget=forms.RadioSelect(choices=Visibility.choices),
                                 help_text="Private adapters are visible only to you.")

    def __init__(self, data=None, *, generators, **kwargs):
        super().__init__(data, **kwargs)
        bases = dict.fromkeys(artifact.base_model.full_name for artifact in generators)  # distinct, in order
        self.fields["base_model"].widget.choices = [(name, name) for name in bases]
        methods = selectors.generation_methods()
        self.fields["method"].widget.choices = methods
        self.fields["method"].initial = methods[0][0]

    def service_arguments(self) -> dict:
        data = self.cleaned_data
        return {"description": data["description"], "base_model": data["base_model"], "method": data["method"],
                "k": data["k"], "name": data["name"] or None, "visibility": data["visibility"]}
