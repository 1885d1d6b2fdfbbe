{{/*
Names, labels and the values derived from several keys. Helpers that describe one component take
(dict "root" $ "component" "<name>").
*/}}

{{- define "twinstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "twinstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "twinstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
<fullname>-<component>, at most 52 characters with the component suffix kept whole: a StatefulSet's
name plus its controller-revision-hash suffix must fit a 63-character label value.
*/}}
{{- define "twinstream.componentName" -}}
{{- $base := include "twinstream.fullname" .root | trunc (int (sub 51 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .component }}
{{- end }}

{{- define "twinstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "twinstream.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "twinstream.labels" -}}
helm.sh/chart: {{ include "twinstream.chart" .root }}
{{ include "twinstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: twinstream
{{- end }}

{{- define "twinstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "twinstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "twinstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
What each service needs: the role of the topic it consumes (a key of topics.names; KEDA scales on
that group's lag) and which backends it talks to. These follow the service code
(twinstream.<name>.__main__), not user choice.
*/}}
{{- define "twinstream.traits" -}}
ingestion: {consumes: raw, kafka: true, milvus: false, triton: false, models: false, data: true}
embedding: {consumes: accepted, kafka: true, milvus: false, triton: true, models: true, data: false}
indexing: {consumes: embedded, kafka: true, milvus: true, triton: false, models: true, data: false}
matching: {consumes: "", kafka: false, produces: true, milvus: true, triton: true, models: true, data: false}
{{- end }}

{{/* The pipeline roles, in flow order: the keys of topics.names and of TWINSTREAM_TOPIC_<ROLE>. */}}
{{- define "twinstream.topicRoles" -}}
raw,accepted,embedded,decisions,dlq
{{- end }}

{{/* The topic names, comma-separated in flow order (the topics Job, NOTES.txt). */}}
{{- define "twinstream.topicList" -}}
{{- $names := list }}
{{- range splitList "," (include "twinstream.topicRoles" .) }}
{{- $names = append $names (required (printf "topics.names.%s is required" .) (index $.Values.topics.names .)) }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/* The services' topic variables: the one place topics.names reaches their settings. */}}
{{- define "twinstream.topicEnv" -}}
{{- range splitList "," (include "twinstream.topicRoles" .) }}
- {name: TWINSTREAM_TOPIC_{{ upper . }}, value: {{ index $.Values.topics.names . | quote }}}
{{- end }}
{{- end }}

{{/* A subchart's fullname, computed the way the milvus and bitnami charts do. (dict "root" $ "chart" "kafka") */}}
{{- define "twinstream.subchartFullname" -}}
{{- $sub := index .root.Values .chart }}
{{- $override := dig "fullnameOverride" "" $sub }}
{{- if $override }}
{{- $override | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := dig "nameOverride" "" $sub | default .chart }}
{{- if contains $name .root.Release.Name }}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .root.Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "twinstream.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled }}
{{- printf "%s:9092" (include "twinstream.subchartFullname" (dict "root" . "chart" "kafka")) }}
{{- else }}
{{- required "externalKafka.bootstrap is required when kafka.enabled is false" .Values.externalKafka.bootstrap }}
{{- end }}
{{- end }}

{{- define "twinstream.milvusUri" -}}
{{- if .Values.milvus.enabled }}
{{- printf "http://%s:19530" (include "twinstream.subchartFullname" (dict "root" . "chart" "milvus")) }}
{{- else }}
{{- required "externalMilvus.uri is required when milvus.enabled is false" .Values.externalMilvus.uri }}
{{- end }}
{{- end }}

{{/* The Secret holding the Milvus token, or "" when Milvus needs none (never from values). */}}
{{- define "twinstream.milvusSecretName" -}}
{{- .Values.externalMilvus.existingSecret }}
{{- end }}

{{/* The kubernetes.io/tls Secret the services serve gRPC TLS from. */}}
{{- define "twinstream.tlsSecretName" -}}
{{- .Values.security.tls.existingSecret | default (include "twinstream.componentName" (dict "root" . "component" "grpc-tls")) }}
{{- end }}

{{/* The Secret holding the bearer-token signing key. */}}
{{- define "twinstream.authSecretName" -}}
{{- .Values.security.auth.existingSecret | default (include "twinstream.componentName" (dict "root" . "component" "token-key")) }}
{{- end }}

{{/* The port kubelet probes and `helm test` reach health on: its own plain-text server and
     thread pool (runtime.healthPort), beside the TLS gRPC port. */}}
{{- define "twinstream.probePort" -}}
{{- .root.Values.runtime.healthPort }}
{{- end }}

{{- define "twinstream.tritonUrl" -}}
{{- if .Values.triton.enabled }}
{{- printf "%s:8001" (include "twinstream.componentName" (dict "root" . "component" "triton")) }}
{{- else }}
{{- required "triton.url is required when triton.enabled is false" .Values.triton.url }}
{{- end }}
{{- end }}

{{- define "twinstream.modelDir" -}}
{{- $dirs := list }}
{{- range .Values.models.bundles }}
{{- $dirs = append $dirs (printf "%s/%s" (trimSuffix "/" $.Values.models.mountPath) (trimPrefix "/" .)) }}
{{- end }}
{{- join "," $dirs }}
{{- end }}

{{/* The models volume (named "models"), read-only for every consumer. */}}
{{- define "twinstream.modelsVolume" -}}
- name: models
{{- if eq .Values.models.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "models.existingClaim is required when models.source is pvc" .Values.models.existingClaim }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.models.sizeLimit }}
{{- end }}
{{- end }}

{{/* For models.source=image: copy the model image's files into the "models" emptyDir. */}}
{{- define "twinstream.modelsInitContainer" -}}
{{- if eq .Values.models.source "image" }}
- name: fetch-models
  image: {{ printf "%s:%s" (required "models.image.repository is required when models.source is image" .Values.models.image.repository) (required "models.image.tag is required when models.source is image" .Values.models.image.tag) }}
  imagePullPolicy: {{ .Values.models.image.pullPolicy }}
  command: ["sh", "-c", {{ printf "cp -a %s/. /work-models/" (trimSuffix "/" .Values.models.image.copyFrom) | quote }}]
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /work-models
{{- end }}
{{- end }}

{{/* The pods' terminationGracePeriodSeconds: the runtime's drain and grace (the same values the
services get as TWINSTREAM_SHUTDOWN_DRAIN_S/_GRACE_S) plus 15 s for the stream loop's final flush
and close. */}}
{{- define "twinstream.terminationGracePeriod" -}}
{{- add .Values.runtime.drainSeconds .Values.runtime.graceSeconds 15 }}
{{- end }}

{{/* Native gRPC probe against grpc.health.v1 on the given port. (dict "port" 50051 "probe" .Values.probes.readiness) */}}
{{- define "twinstream.grpcProbe" -}}
grpc:
  port: {{ .port }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/* Secret volumes (read-only, 0400) a service needs: gRPC TLS, the token key, backend CAs. (dict "root" $ "trait" $trait) */}}
{{- define "twinstream.secretVolumes" -}}
{{- $v := .root.Values }}
{{- if $v.security.tls.enabled }}
- name: grpc-tls
  secret: {secretName: {{ include "twinstream.tlsSecretName" .root }}, defaultMode: 0400}
{{- end }}
{{- if $v.security.auth.enabled }}
- name: token-key
  secret: {secretName: {{ include "twinstream.authSecretName" .root }}, defaultMode: 0400}
{{- end }}
{{- if and (or .trait.kafka .trait.produces) $v.externalKafka.tls.existingSecret }}
- name: kafka-tls
  secret: {secretName: {{ $v.externalKafka.tls.existingSecret }}, defaultMode: 0400}
{{- end }}
{{- if and .trait.milvus $v.externalMilvus.tls.existingSecret }}
- name: milvus-tls
  secret: {secretName: {{ $v.externalMilvus.tls.existingSecret }}, defaultMode: 0400}
{{- end }}
{{- end }}

{{- define "twinstream.secretMounts" -}}
{{- $v := .root.Values }}
{{- if $v.security.tls.enabled }}
- {name: grpc-tls, mountPath: /etc/twinstream/tls, readOnly: true}
{{- end }}
{{- if $v.security.auth.enabled }}
- {name: token-key, mountPath: /etc/twinstream/auth, readOnly: true}
{{- end }}
{{- if and (or .trait.kafka .trait.produces) $v.externalKafka.tls.existingSecret }}
- {name: kafka-tls, mountPath: /etc/twinstream/kafka-tls, readOnly: true}
{{- end }}
{{- if and .trait.milvus $v.externalMilvus.tls.existingSecret }}
- {name: milvus-tls, mountPath: /etc/twinstream/milvus-tls, readOnly: true}
{{- end }}
{{- end }}

{{/* One egress rule: the peers (none = any address) on the ports. (.Values.networkPolicy.egress.kafka) */}}
{{- define "twinstream.egressRule" -}}
- ports:
    {{- range .ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
