{{/* Chart name, truncated to leave room for suffixes within the 63-character name limit. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: finetune-operator
helm.sh/chart: {{ include "finetune-operator.chart" . | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of objects that are not the operator (worker RBAC): no component=operator. */}}
{{- define "finetune-operator.workerLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: finetune-operator
helm.sh/chart: {{ include "finetune-operator.chart" . | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the worker ServiceAccount, as a JSON list (templates iterate `fromJsonArray`). */}}
{{- define "finetune-operator.workerNamespaces" -}}
{{- if .Values.worker.namespaces -}}
{{- toJson .Values.worker.namespaces -}}
{{- else if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else -}}
{{- toJson (list "default") -}}
{{- end -}}
{{- end -}}

{{/*
Rules of the operator on namespaced objects. One definition for the ClusterRole (all-namespaces mode) and
the per-namespace Roles (watchNamespaces mode), so both modes grant exactly the same. Exactly what the
operator uses: tests/test_rbac.py records every API request of an operator session (started with this
chart's arguments) and fails on a request these rules deny and on a permission no request used.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# FineTuneJobs: kopf lists and watches them; the reconciler reads one, and records the accepted spec in an
# annotation (patch) before creating the first child.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Status: state, conditions, stages, outputs.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Training workloads of the four backends. Watched (label-selected) to follow them; patched to suspend and
# resume; deleted and re-created to retry a failed stage.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch.tensorstack.dev"]
  resources: ["deepspeedjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The vLLM Deployment: watched for availability, patched to scale to spec.serve.replicas.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Generated LLaMA-Factory configs, the headless Services of multi-node Jobs and the vLLM Service: created
# once (create-or-get); their content is a function of the accepted spec, so they are never patched.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create"]
# Events about FineTuneJobs (stage started/succeeded/retrying, serving, ...).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* Read-only access to cluster-scoped objects the kopf framework observes. */}}
{{- define "finetune-operator.clusterRules" -}}
# kopf watches CustomResourceDefinitions to notice when a watched resource appears or disappears.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* The web console's labels (component=console: never selected by the operator's Service). */}}
{{- define "finetune-operator.consoleSelectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: console
{{- end -}}
{{- define "finetune-operator.consoleLabels" -}}
{{ include "finetune-operator.consoleSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: finetune-operator
helm.sh/chart: {{ include "finetune-operator.chart" . | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
