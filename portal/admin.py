"""The audit log in admin: read-only, filterable by object type, action and user."""

from django.contrib import admin

from portal.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("timestamp", "actor", "action", "content_type", "object_repr", "request_id")
    list_filter = ("action", "content_type", "actor")
    search_fields = ("object_repr", "object_id", "actor", "request_id", "message")
    date_hierarchy = "timestamp"
    list_select_related = ("content_type",)
    readonly_fields = [f.name for f in AuditEntry._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
