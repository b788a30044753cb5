from django.contrib import admin

from hub.models import Adapter, BaseModel, Blob, Job, Revision


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = ["namespace", "name", "base_model", "format", "rank", "visibility", "updated_at"]
    list_filter = ["format", "visibility", "base_model"]
    search_fields = ["namespace", "name", "description"]


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ["namespace", "name", "architecture", "parameter_count", "created_at"]


@admin.register(Revision)
class RevisionAdmin(admin.ModelAdmin):
    list_display = ["adapter", "number", "commit", "created_at"]


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "state", "progress", "created_at", "finished_at"]
    list_filter = ["kind", "state"]


admin.site.register(Blob)
