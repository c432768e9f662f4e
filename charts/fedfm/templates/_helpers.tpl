{{/* Names and labels shared by every template. */}}

{{- define "fedfm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fedfm.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedfm
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fedfm.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "fedfm.operatorName" -}}
{{- printf "%s-operator" (include "fedfm.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedfm.operatorServiceAccount" -}}
{{- default (include "fedfm.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{/* An image by digest (REPOSITORY@sha256:...) when one is given: what was pushed and nothing else runs, whoever
       moves the tag; else by tag (default: the chart's appVersion). */}}
{{- define "fedfm.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "fedfm.operatorImage" -}}
{{- include "fedfm.image" (dict "image" .Values.operator.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "fedfm.clientImage" -}}
{{- include "fedfm.image" (dict "image" .Values.clientImage "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The rules of a generated role in rbac/ (operators/rbac.py writes them; the chart binds them). */}}
{{- define "fedfm.rules" -}}
{{- $role := .context.Files.Get (printf "rbac/%s" .file) | fromYaml -}}
{{- toYaml $role.rules -}}
{{- end -}}
