{{/*
Names. The operator's own objects carry app.kubernetes.io/name
"starling-operator", never "starling": the operator selects a Broker's pods
by app.kubernetes.io/name=starling plus app.kubernetes.io/instance=<broker>,
so a release and a Broker of the same name would otherwise put the operator
pod behind that Broker's Services.
*/}}
{{- define "starling.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "starling.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "starling.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "starling.selectorLabels" -}}
app.kubernetes.io/name: {{ include "starling.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "starling.labels" -}}
helm.sh/chart: {{ include "starling.chart" . }}
{{ include "starling.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: starling
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of the example Broker, Token and ACL (not the operator's). */}}
{{- define "starling.exampleLabels" -}}
helm.sh/chart: {{ include "starling.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: starling
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "starling.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "starling.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The one namespace watched with watch.scope=namespace. */}}
{{- define "starling.watchNamespace" -}}
{{- default .Release.Namespace .Values.watch.namespace -}}
{{- end -}}

{{/* Namespace of the example Broker, Token and ACL. */}}
{{- define "starling.exampleNamespace" -}}
{{- if .Values.exampleBroker.namespace -}}
{{- .Values.exampleBroker.namespace -}}
{{- else if eq .Values.watch.scope "namespace" -}}
{{- include "starling.watchNamespace" . -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
The operator image: <registry>/<repository>:<tag, default appVersion>, or
<registry>/<repository>@<digest> when image.digest is set. The same scheme
names the broker image the operator defaults to (DEFAULT_IMAGE in
operator/src/crd/broker.rs): ghcr.io/starling-mqtt/starling-broker:<version>.
*/}}
{{- define "starling.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if .Values.image.registry -}}
{{- $repo = printf "%s/%s" .Values.image.registry .Values.image.repository -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions, exactly operator/README.md "RBAC the operator
needs" (scripts/chart-check.sh fails when the two drift apart). One list for
the ClusterRole (watch.scope=cluster) and the Role (watch.scope=namespace).
*/}}
{{- define "starling.operatorRules" -}}
- apiGroups: [starling.dev]
  resources: [brokers, tokens, acls]
  verbs: [get, list, watch]
- apiGroups: [starling.dev]
  resources: [brokers/status, tokens/status, acls/status]
  verbs: [get, patch, update]
# secrets: bundle, TLS, CA, admin and token credentials; also read for Token
# secretRef and Broker tls.secretRef (and granted on to the broker pods)
- apiGroups: [""]
  resources: [secrets, configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
# the broker pods' Role (get/list/watch on 2 Secrets) and its binding
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
# made for Brokers with tls.certManager; listed by label and deleted once unwanted
- apiGroups: [cert-manager.io]
  resources: [certificates]
  verbs: [get, list, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "starling.leaderRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, update, patch]
{{- end -}}

{{/* Relabelings shared by the broker ServiceMonitor and PodMonitor. */}}
{{- define "starling.brokerRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
  targetLabel: broker
  action: replace
{{- end -}}

{{/* Which namespaces the broker monitors look in. */}}
{{- define "starling.brokerNamespaceSelector" -}}
{{- if eq .Values.watch.scope "namespace" -}}
matchNames: [{{ include "starling.watchNamespace" . | quote }}]
{{- else -}}
any: true
{{- end -}}
{{- end -}}

{{/* Labels every Broker's pods and Services carry (operator/src/build/mod.rs). */}}
{{- define "starling.brokerSelector" -}}
matchLabels:
  app.kubernetes.io/name: starling
  app.kubernetes.io/component: broker
  app.kubernetes.io/managed-by: starling-operator
{{- end -}}
